"""The application's one HTTP entry: checks the API key, picks the routing key, forwards to a replica.

Everything else (request validation, errors, generation, streaming, /v1/models, per-replica /metrics) is the
single server's app running in the replica (replica.py), so a client cannot tell the two apart except by the
`x-loraserve-replica` response header naming the replica that answered. A request may name one in the same
header to be served there (debugging, one replica's /metrics).

The routing key is the content hash of the adapter the request's `model` names (a mix: its first adapter),
so routers compare residency by what the weights are, not by a per-process id. A replica lost before it
answered is retried once on another one; lost mid-stream, the stream ends with an error event.
"""

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayActorError

from loraserve.ray.asgi import HTTPRequest, ResponseHead
from loraserve.ray.catalog import CatalogEntry, CatalogSnapshot
from loraserve.ray.replica import LOAD_PATH, REPLICA_HEADER, UNLOAD_PATH
from loraserve.ray.router import Route
from loraserve.server.api import ServerSettings, authenticate, cancel_on_disconnect, runtime_updating_disabled
from loraserve.server.error_handlers import ErrorReporter, install_error_handlers
from loraserve.server.metrics import ServerMetrics
from loraserve.server.policy import BodyLimit, Tenants
from loraserve.server.protocol import APIError
from loraserve.server.streaming import DONE, sse
from loraserve.version import __version__

logger = logging.getLogger(__name__)
CATALOG_MAX_AGE_S = 1.0  # how stale this ingress's copy of the adapter table may be (other ingress replicas)
SCRAPE_TIMEOUT_S = 5.0
CATCH_UP_TIMEOUT_S = 120.0  # a replica may be reading the new adapter from a slow disk

app = FastAPI(title="loraserve on Ray Serve", version=__version__)
metrics = ServerMetrics()  # this ingress's refusals (401, 413...); /metrics adds them as replica="ingress"
report_error = ErrorReporter(metrics)
install_error_handlers(app, report_error)


class _Families:
    """Prometheus collector over metric families parsed from the replicas' /metrics."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def _rest(stream, head: ResponseHead) -> AsyncIterator[bytes]:
    """The body after the head. A replica lost mid-stream: a server-sent error event, then [DONE]."""
    if not head.more:
        return
    try:
        async for part in stream:
            yield part
    except RayActorError as e:
        if _is_event_stream(head):
            yield sse(APIError(503, f"the replica serving this response was lost mid-way "
                                    f"({e.__class__.__name__}); send the request again").body()).encode()
            yield DONE.encode()
    finally:
        stream.cancel()


def _is_event_stream(head: ResponseHead) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in head.headers)


def _response(head: ResponseHead, rest: AsyncIterator[bytes]) -> Response:
    if head.more:
        async def body() -> AsyncIterator[bytes]:
            yield head.body
            async for part in rest:
                yield part
        response: Response = StreamingResponse(body(), status_code=head.status)
    else:
        response = Response(head.body, status_code=head.status)
    response.raw_headers = head.headers
    return response


@serve.ingress(app)
class Ingress:
    def __init__(self, settings: ServerSettings, replicas, catalog) -> None:
        self.settings = settings
        self.replicas = replicas
        self.catalog = catalog
        self.snapshot = CatalogSnapshot(0, {m.name: CatalogEntry(m.path, m.base_model_name)
                                            for m in settings.lora_modules})
        self.refreshed = float("-inf")
        self.tenants = Tenants(settings.api_key, settings.api_keys_file)
        app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes, refused=report_error.scope)

    @app.get("/version")
    async def version(self) -> dict:
        return {"version": __version__}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(self, path: str, request: Request) -> Response:
        path = "/" + path
        principal = None
        if path.startswith("/v1/"):
            principal = authenticate(request, self.tenants)
        pin = request.headers.get(REPLICA_HEADER)
        if path == "/metrics" and pin is None:
            return await self._metrics()
        if path in (LOAD_PATH, UNLOAD_PATH) and not self.settings.allow_runtime_lora_updating:
            raise runtime_updating_disabled()
        if pin is not None:
            await self._check_running(pin)
        body = await request.body()
        await self._refresh(CATALOG_MAX_AGE_S)
        adapter = await self._adapter_key(body) if request.method == "POST" else ""
        forwarded = HTTPRequest(request.method, path, request.url.query.encode(),
                                [(k, v) for k, v in request.headers.raw if k.lower() != REPLICA_HEADER.encode()],
                                body, principal)
        route = Route(adapter=adapter, replica=pin, version=self.snapshot.version)
        head, rest = await cancel_on_disconnect(request, self._exchange(route, forwarded))
        if head.status == 200 and path in (LOAD_PATH, UNLOAD_PATH):
            await self._commit(path, json.loads(body), head.body)
        return _response(head, rest)

    async def _check_running(self, replica: str) -> None:
        """A request pinned to a replica that is not running would wait for it forever: 404 instead."""
        running = await self.replicas.broadcast("identity").results_async(timeout_s=SCRAPE_TIMEOUT_S,
                                                                           return_exceptions=True)
        running = sorted(r for r in running if isinstance(r, str))
        if replica not in running:
            raise APIError(404, f"no running replica is named {replica!r} (header {REPLICA_HEADER}); running: "
                           f"{', '.join(running)}. Drop the header to let the router choose", REPLICA_HEADER,
                           "not_found")

    # ---- adapters --------------------------------------------------------------------------------

    async def _refresh(self, max_age: float) -> None:
        if time.monotonic() - self.refreshed >= max_age:
            self.snapshot = await self.catalog.snapshot.remote()
            self.refreshed = time.monotonic()

    async def _adapter_key(self, body: bytes) -> str:
        """The content hash of the adapter a generation request applies; '' for the base model and for what
        the replica will refuse anyway (bad JSON, unknown name)."""
        try:
            payload = json.loads(body)
        except ValueError:
            return ""
        if not isinstance(payload, dict):
            return ""
        mix = payload.get("adapters")
        first = mix[0] if isinstance(mix, list) and mix else None
        name = first.get("name") if isinstance(first, dict) else payload.get("model")
        if not isinstance(name, str) or name in self.settings.served_model_names:
            return ""
        entry = self.snapshot.adapters.get(name)
        if entry is None or entry.content_hash is None:  # loaded through another ingress, or not yet hashed
            await self._refresh(0)
            entry = self.snapshot.adapters.get(name)
        return (entry.content_hash or "") if entry is not None else ""

    async def _commit(self, path: str, body: dict, answer: bytes) -> None:
        """Record a load / unload one replica has validated, then bring every running replica up to date
        (those Serve starts later catch up on their first request)."""
        if path == LOAD_PATH:
            version = await self.catalog.put.remote(body["lora_name"], body["lora_path"],
                                                    json.loads(answer)["lora"]["content_hash"])
        else:
            version = await self.catalog.remove.remote(body["lora_name"])
        await self._refresh(0)
        results = await self.replicas.broadcast("catch_up", version).results_async(
            timeout_s=CATCH_UP_TIMEOUT_S, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("a replica did not catch up with adapter catalog version %d: %r", version, result)

    # ---- forwarding ------------------------------------------------------------------------------

    async def _exchange(self, route: Route, request: HTTPRequest) -> tuple[ResponseHead, AsyncIterator[bytes]]:
        """The replica's response head and the rest of its body. A replica lost before it answered: once more
        on another replica (Serve drops a dead replica from routing as the call fails), unless pinned."""
        for attempt in range(2):
            stream = self.replicas.options(stream=True, multiplexed_model_id=route.adapter).forward.remote(
                route, request)
            try:
                head = await anext(stream)
            except RayActorError as e:
                stream.cancel()
                if attempt == 0 and route.replica is None:
                    logger.warning("replica lost before answering (%s); retrying on another", e.__class__.__name__)
                    continue
                raise APIError(503, f"the replica serving this request was lost before it answered "
                               f"({e.__class__.__name__}); send the request again") from e
            except BaseException:
                stream.cancel()
                raise
            return head, _rest(stream, head)
        raise AssertionError("unreachable")

    async def _metrics(self) -> Response:
        """Every running replica's /metrics, each series labelled with replica="<id>"."""
        try:
            scraped = await self.replicas.broadcast("scrape").results_async(timeout_s=SCRAPE_TIMEOUT_S,
                                                                             return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - a busy or lost replica: serve what is known, not a 500
            logger.warning("the replicas' /metrics could not be gathered: %r", e)
            scraped = []
        families: dict[str, Metric] = {}
        for result in [*scraped, ("ingress", generate_latest(metrics.registry))]:
            if isinstance(result, BaseException):
                logger.warning("a replica's /metrics could not be read: %r", result)
                continue
            replica, text = result
            for family in text_string_to_metric_families(text.decode()):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples += [s._replace(labels=s.labels | {"replica": replica}) for s in family.samples]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(families.values())))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
