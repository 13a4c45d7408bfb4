"""The FastAPI app: routes, API-key check, and the mapping of every error to OpenAI's error shape.

One process: uvicorn runs the app on its event loop while AsyncLLMEngine steps the batch in a thread.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.exceptions import HTTPException

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.errors import EngineDeadError, LoRAError, ParamError
from loraserve.server.adapters import AdapterRegistry, LoRAModule
from loraserve.server.metrics import ServerMetrics
from loraserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    bad_request,
    param_error,
)
from loraserve.server.serving import OpenAIServing
from loraserve.version import __version__

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerSettings:
    served_model_names: list[str]
    lora_modules: list[LoRAModule] = field(default_factory=list)
    api_key: str | None = None
    allow_runtime_lora_updating: bool = False


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client disconnects first; then cancel it, which aborts its engine requests
    and frees their KV blocks (Starlette does this itself only once a streaming response has started)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, with the parameter it concerns (a dotted path such as messages.0.content)."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    param = (error.get("ctx") or {}).get("param")
    if param is not None:
        return bad_request(error["msg"], param)
    loc = [str(part) for part in error["loc"] if part != "body"]
    param = ".".join(loc) or None
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown parameter; loraserve does not accept it (see the OpenAI API reference for the names)"
    elif error["type"] == "missing":
        message = "this parameter is required"
    return bad_request(f"{param}: {message}" if param else f"the request body is invalid: {message}", param)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (nothing to check without a key)."""
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise APIError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


def runtime_updating_disabled() -> APIError:
    return APIError(404, "runtime adapter loading is disabled; start the server with --allow-runtime-lora-updating "
                    "to load and unload adapters", code="not_found")


def install_error_handlers(app: FastAPI) -> None:
    def respond(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(_validation_error(exc))

    @app.exception_handler(ParamError)  # a parameter the client can fix; any other ValueError is a bug (500)
    async def parameter_error(_: Request, exc: ParamError) -> JSONResponse:
        return respond(param_error(exc))

    @app.exception_handler(LoRAError)
    async def adapter_error(_: Request, exc: LoRAError) -> JSONResponse:
        return respond(bad_request(str(exc), "model"))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return respond(APIError(503, str(exc)))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return respond(APIError(500, f"internal server error: {exc!r}"))


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """Validate and register the start-up adapters (a bad one raises LoRAError: the server does not start),
    then build the app. Blocks while the adapters are read: call it before serving, not on an event loop."""
    adapters = AdapterRegistry(settings.served_model_names, str(engine.model_path))
    for module in settings.lora_modules:
        lora = adapters.begin_load(module)
        try:
            engine.add_lora_blocking(lora)
            report = engine.lora_report_blocking(lora)
        except BaseException:
            adapters.cancel_load(lora)
            raise
        adapters.finish_load(lora, report)
    metrics = ServerMetrics()
    serving = OpenAIServing(engine, adapters, metrics)
    max_model_len = engine.limits.max_model_len

    async def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    app = FastAPI(title="loraserve", version=__version__)
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    async def respond(request: Request, work: Awaitable[dict | AsyncIterator[str]]) -> Response:
        result = await cancel_on_disconnect(request, work)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        if not engine.healthy:
            raise APIError(503, f"the engine has stopped: {engine.error!r}")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(await engine.stats()), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": adapters.cards(max_model_len)}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await respond(request, serving.completions(body))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(request, serving.chat(body))

    def check_runtime_updating() -> None:
        if not settings.allow_runtime_lora_updating:
            raise runtime_updating_disabled()
        if not engine.limits.lora_enabled:
            raise bad_request("LoRA is not enabled on this server; start it with --enable-lora")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> JSONResponse:
        """Read and validate off the event loop, then serve the name; with load_inplace the name switches to
        the new files at once for new requests, while running ones finish on the weights they started with.
        The body: vLLM's success message and the adapter's load report."""
        check_runtime_updating()
        lora = adapters.begin_load(LoRAModule(body.lora_name, body.lora_path), replace=body.load_inplace)
        try:
            await engine.add_lora(lora)
            report = await engine.lora_report(lora)
        except BaseException as e:
            adapters.cancel_load(lora)
            await engine.remove_lora(lora.lora_int_id)  # nothing of it may stay behind in the engine
            if isinstance(e, LoRAError):
                raise bad_request(str(e), "lora_path") from e
            raise
        replaced = adapters.finish_load(lora, report)
        if replaced is not None:
            await engine.remove_lora(replaced.lora_int_id)
            return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' reloaded in place.",
                                 "lora": report})
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                             "lora": report})

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        """New requests for the name get 404 at once; running ones finish, then its memory is freed."""
        check_runtime_updating()
        lora = adapters.remove(body.lora_name)
        await engine.remove_lora(lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)
    return app


def run_server(engine: AsyncLLMEngine, settings: ServerSettings, host: str, port: int,
               shutdown_timeout: float = 3.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to
    `shutdown_timeout` seconds, cancel (abort) the rest, stop the engine, return."""
    disable_created_metrics()  # process-wide: drop the *_created series, noise to most scrapers
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    # uvicorn re-raises the stop signal after its graceful stop, to the handler it found at start; a no-op
    # handler there makes the process return normally (exit status 0) instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()
