"""Run one HTTP request through an ASGI app in this process and stream its response back.

A replica serves requests with the single server's own FastAPI app (server/api.py), so the ingress forwards
the request's method, path, headers and body, not a parsed form: validation, errors, streaming and metrics
stay the single server's code. Closing the response stream early tells the app the client is gone, which
aborts the engine requests as a dropped HTTP connection would.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

from loraserve.server.policy import PRINCIPAL_SCOPE_KEY, Principal


@dataclass
class HTTPRequest:
    """What the ingress forwards: enough to rebuild the request for the app."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    principal: Principal | None = None  # who the ingress authenticated; the app takes it instead of a key


@dataclass
class ResponseHead:
    """The response's status and headers with the first part of its body: a JSON response whole, a stream's
    first event (so a replica lost before it is known to have sent nothing)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    more: bool  # more body parts follow


async def call(app: ASGIApp, request: HTTPRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Yield the response's head, then each further body part."""
    outbox: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        outbox.put_nowait(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query, "root_path": "", "headers": request.headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    if request.principal is not None:
        scope[PRINCIPAL_SCOPE_KEY] = request.principal

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            outbox.put_nowait(e)
        finally:
            outbox.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        start: Message | None = None
        head_sent = False
        while (message := await outbox.get()) is not None:
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body" and start is not None:
                more = message.get("more_body", False)
                if not head_sent:
                    head_sent = True
                    yield ResponseHead(start["status"], list(start.get("headers", [])), message.get("body", b""),
                                       more)
                elif message.get("body"):
                    yield message["body"]
                if not more:
                    return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
        if not task.done():
            task.cancel()


async def fetch(app: ASGIApp, request: HTTPRequest) -> ResponseHead:
    """The whole response: its head with every body part joined."""
    parts = call(app, request)
    try:
        head = await anext(parts)
        assert isinstance(head, ResponseHead)
        rest = [part async for part in parts]
    finally:
        await parts.aclose()
    return dataclasses.replace(head, body=head.body + b"".join(rest), more=False)
