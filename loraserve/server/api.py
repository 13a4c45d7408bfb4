"""The FastAPI app: routes, API-key check, and the mapping of every error to OpenAI's error shape.

One process: uvicorn runs the app on its event loop while AsyncLLMEngine steps the batch in a thread.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.errors import AdapterSourceError, LoRAError
from loraserve.server.adapters import AdapterRegistry, LoRAModule
from loraserve.server.error_handlers import ClientGone, ErrorReporter, install_error_handlers
from loraserve.server.metrics import ServerMetrics
from loraserve.server.policy import PRINCIPAL_SCOPE_KEY, Admission, BodyLimit, Limits, Principal, Tenants
from loraserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    bad_request,
)
from loraserve.server.serving import OpenAIServing
from loraserve.version import __version__

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEAD_ENGINE_EXIT_STATUS = 70  # EX_SOFTWARE: the engine died; a supervisor should restart the process
DEAD_ENGINE_GRACE_S = 2.0


@dataclass
class ServerSettings:
    """Everything the app is built from; plain data, so the Ray launcher can ship it to replicas."""

    served_model_names: list[str]
    lora_modules: list[LoRAModule] = field(default_factory=list)
    api_key: str | None = None
    api_keys_file: str | None = None
    allow_runtime_lora_updating: bool = False
    lora_roots: tuple[str, ...] = ()  # adapter folders must resolve inside one; empty: anywhere
    allow_lora_bin: bool = False  # runtime loads may read adapter_model.bin (a pickle)
    limits: Limits = field(default_factory=Limits)


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


def runtime_updating_disabled() -> APIError:
    return APIError(404, "runtime adapter loading is disabled; start the server with --allow-runtime-lora-updating "
                    "to load and unload adapters", code="not_found", reason="runtime_loading_disabled")


def authenticate(request: Request, tenants: Tenants) -> Principal:
    """The request's principal: handed over in the ASGI scope by the Ray ingress (in-process, out of any
    client's reach), else from its API key. Kept in request.state for the error log."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        principal = tenants.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """Validate and register the start-up adapters (a bad one raises LoRAError: the server does not start),
    then build the app. Blocks while the adapters are read: call it before serving, not on an event loop."""
    adapters = AdapterRegistry(settings.served_model_names, str(engine.model_path))
    check_source = engine.adapter_sources(settings.lora_roots, settings.allow_lora_bin)
    for module in settings.lora_modules:
        lora = adapters.begin_load(module.at(check_source(module.path, False)))
        try:
            engine.add_lora_blocking(lora)
            report = engine.lora_report_blocking(lora)
        except BaseException:
            adapters.cancel_load(lora)
            raise
        adapters.finish_load(lora, report)
    tenants = Tenants(settings.api_key, settings.api_keys_file)
    metrics = ServerMetrics()
    report_error = ErrorReporter(metrics)
    serving = OpenAIServing(engine, adapters, metrics, settings.limits, Admission(settings.limits), report_error)
    max_model_len = engine.limits.max_model_len

    async def principal(request: Request) -> Principal:
        return authenticate(request, tenants)

    app = FastAPI(title="loraserve", version=__version__)
    app.state.tenants = tenants  # run_server reloads the keys file on SIGHUP
    install_error_handlers(app, report_error)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes, refused=report_error.scope)
    v1 = APIRouter(prefix="/v1")
    Caller = Depends(principal)

    async def respond(request: Request, work: Awaitable[dict | AsyncIterator[str]]) -> Response:
        result = await cancel_on_disconnect(request, work)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        if not engine.healthy:
            raise APIError(503, "the engine has stopped; the server is exiting (see its log)", reason="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(await engine.stats()), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models(caller: Principal = Caller) -> dict:
        return {"object": "list", "data": adapters.cards(max_model_len, caller)}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request, caller: Principal = Caller) -> Response:
        return await respond(request, serving.completions(body, caller))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Principal = Caller) -> Response:
        return await respond(request, serving.chat(body, caller))

    def check_runtime_updating(caller: Principal, name: str) -> None:
        if not settings.allow_runtime_lora_updating:
            raise runtime_updating_disabled()
        if not engine.limits.lora_enabled:
            raise bad_request("LoRA is not enabled on this server; start it with --enable-lora")
        if not caller.may_use(name):
            raise APIError(403, f"this API key may not load or unload an adapter named {name!r}; the names it may "
                           f"use are {list(caller.adapters)} (its entry in --api-keys-file)", "lora_name",
                           "forbidden", reason="adapter_not_allowed")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, caller: Principal = Caller) -> JSONResponse:
        """Check the path against --lora-roots, read and validate off the event loop, then serve the name; with
        load_inplace the name switches to the new files at once for new requests, while running ones finish on
        the weights they started with. The body: vLLM's success message and the adapter's load report."""
        check_runtime_updating(caller, body.lora_name)
        try:
            path = await asyncio.get_running_loop().run_in_executor(None, check_source, body.lora_path, True)
        except LoRAError as e:
            if isinstance(e, AdapterSourceError):
                raise
            raise bad_request(str(e), "lora_path") from e
        lora = adapters.begin_load(LoRAModule(body.lora_name, path), replace=body.load_inplace)
        try:
            await engine.add_lora(lora)
            report = await engine.lora_report(lora)
        except BaseException as e:
            adapters.cancel_load(lora)
            await engine.remove_lora(lora.lora_int_id)  # nothing of it may stay behind in the engine
            if isinstance(e, LoRAError) and not isinstance(e, AdapterSourceError):
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
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, caller: Principal = Caller) -> PlainTextResponse:
        """New requests for the name get 404 at once; running ones finish, then its memory is freed."""
        if not caller.may_use(body.lora_name):  # another tenant's adapter: as if there were none
            raise adapters.not_loaded(body.lora_name)
        check_runtime_updating(caller, body.lora_name)
        lora = adapters.remove(body.lora_name)
        await engine.remove_lora(lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server with loraserve's stop rules. SIGTERM/SIGINT: stop accepting, let in-flight requests
    finish for `drain` seconds, then stop the engine, which ends every open stream with an error event. The
    engine dying on its own: /health answers 503 for DEAD_ENGINE_GRACE_S (for probes to see), then the same
    stop, and the process exits non-zero so a supervisor restarts it."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain = drain
        self.engine_died_at: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.drain, self.engine.shutdown)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.engine.stopped.is_set() and self.engine.error is not None:
            now = asyncio.get_running_loop().time()
            if self.engine_died_at is None:
                self.engine_died_at = now
                logger.error("the engine died; exiting in %.0f s with status %d", DEAD_ENGINE_GRACE_S,
                             DEAD_ENGINE_EXIT_STATUS)
            if now - self.engine_died_at >= DEAD_ENGINE_GRACE_S:
                return True
        return await super().on_tick(counter)


def run_server(engine: AsyncLLMEngine, settings: ServerSettings, host: str, port: int,
               shutdown_timeout: float = 3.0, log_level: str = "info", log_format: str = "text") -> int:
    """Serve until SIGTERM/SIGINT or the engine's death; the process's exit status (0, or
    DEAD_ENGINE_EXIT_STATUS). SIGHUP re-reads --api-keys-file without dropping a request."""
    disable_created_metrics()  # process-wide: drop the *_created series, noise to most scrapers
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            log_config=None if log_format == "json" else uvicorn.config.LOGGING_CONFIG,
                            timeout_graceful_shutdown=shutdown_timeout + 10)  # a backstop: the engine's stop ends all
    server = _Server(config, engine, shutdown_timeout)

    def reload_keys(*_) -> None:
        try:
            app.state.tenants.reload()
        except ValueError as e:
            logger.error("SIGHUP: the API keys were not reloaded, the old ones stay: %s", e)

    # uvicorn re-raises the stop signal after its graceful stop, to the handler it found at start; a no-op
    # handler there makes the process return normally (exit status 0) instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload_keys)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()
    return DEAD_ENGINE_EXIT_STATUS if server.engine_died_at is not None else 0
