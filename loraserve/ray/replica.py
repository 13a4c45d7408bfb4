"""One Serve replica: one loraserve engine behind the single server's own app (server/api.py).

The ingress forwards each HTTP request here whole; the app validates it, runs it and shapes the response
exactly as `loraserve serve` does. Mixed-adapter batching is the engine's: Serve only decides which replica a
request joins. The replica keeps its adapters in step with the catalog (catalog.py) and reports its residency
(content hashes in slots and in host memory) and load as routing stats for the router (router.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

from ray import serve

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.ray.asgi import HTTPRequest, ResponseHead, call, fetch
from loraserve.ray.catalog import CatalogSnapshot
from loraserve.ray.router import Route
from loraserve.server.api import ServerSettings, build_app

logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-loraserve-replica"
LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


class EngineReplica:
    def __init__(self, config: EngineConfig, settings: ServerSettings, catalog) -> None:
        """`settings`: the application's; the app here takes no API key (the ingress authenticates and hands
        over the principal) and always allows adapter loading (only the ingress and the catalog reach it)."""
        self.id = serve.get_replica_context().replica_id.unique_id
        self.config = config
        self.catalog = catalog
        self.engine = AsyncLLMEngine.from_config(config)
        local = dataclasses.replace(settings, api_key=None, api_keys_file=None, allow_runtime_lora_updating=True)
        self.app = build_app(self.engine, local)
        self.version = 0  # the catalog version this replica's adapters match
        self.served = {m.name: m.path for m in settings.lora_modules}  # name -> path, as loaded here
        self._sync_lock = asyncio.Lock()
        self._hashes: dict[str, str] | None = None

    async def use_adapter(self, key: str) -> str:
        """Serve's multiplexing hook: decorated with @serve.multiplexed where Serve's own routing is
        benchmarked (app.py); a no-op otherwise."""
        return key

    async def forward(self, route: Route, request: HTTPRequest) -> AsyncIterator[ResponseHead | bytes]:
        """The response to `request`: its head (with this replica's id), then body parts."""
        if route.replica not in (None, self.id):
            raise RuntimeError(f"a request pinned to replica {route.replica} reached replica {self.id}")
        if route.adapter:
            await self.use_adapter(route.adapter)
        await self._catch_up(route.version)
        async for part in call(self.app, request):
            if isinstance(part, ResponseHead):
                part.headers.append((REPLICA_HEADER.encode(), self.id.encode()))
                if part.status == 200 and request.path in (LOAD_PATH, UNLOAD_PATH):
                    self._note_change(request)
            yield part

    def _note_change(self, request: HTTPRequest) -> None:
        """A load or unload the ingress had this replica validate: it is served here already, so catching up
        with the catalog version that records it has nothing to do."""
        body = json.loads(request.body)
        if request.path == LOAD_PATH:
            self.served[body["lora_name"]] = body["lora_path"]
        else:
            self.served.pop(body["lora_name"], None)
        self._hashes = None

    async def _catch_up(self, version: int) -> None:
        if version <= self.version:
            return
        async with self._sync_lock:
            if version <= self.version:
                return
            snapshot: CatalogSnapshot = await self.catalog.snapshot.remote()
            await self._apply(snapshot)

    async def _apply(self, snapshot: CatalogSnapshot) -> None:
        """Load (in place) what changed, unload what went, through the app's own endpoints. An adapter that
        cannot be loaded here (its path missing on this node, say) is logged; requests for it get the app's
        404 on this replica."""
        for name in [n for n in self.served if n not in snapshot.adapters]:
            await self._local(UNLOAD_PATH, {"lora_name": name})
        for name, entry in snapshot.adapters.items():
            if self.served.get(name) != entry.path:
                await self._local(LOAD_PATH, {"lora_name": name, "lora_path": entry.path, "load_inplace": True})
        self.version = max(self.version, snapshot.version)

    async def _local(self, path: str, body: dict) -> None:
        request = HTTPRequest("POST", path, headers=[(b"content-type", b"application/json")],
                              body=json.dumps(body).encode())
        head = await fetch(self.app, request)
        if head.status == 200:
            self._note_change(request)
        else:
            logger.error("replica %s could not apply %s %s: %s", self.id, path, body,
                         head.body.decode(errors="replace"))

    async def _content_hashes(self) -> dict[str, str]:
        """Adapter name -> content hash, from the app's /v1/models (each card's load report)."""
        if self._hashes is None:
            head = await fetch(self.app, HTTPRequest("GET", "/v1/models"))
            cards = json.loads(head.body)["data"]
            self._hashes = {c["id"]: c["lora"]["content_hash"] for c in cards if "lora" in c}
        return self._hashes

    def identity(self) -> str:
        """This replica's id (the ingress checks a pinned request against the running ones)."""
        return self.id

    async def catch_up(self, version: int) -> str:
        """Broadcast by the ingress after a load or unload."""
        await self._catch_up(version)
        return self.id

    async def scrape(self) -> tuple[str, bytes]:
        """This replica's /metrics, broadcast by the ingress's /metrics."""
        return self.id, (await fetch(self.app, HTTPRequest("GET", "/metrics"))).body

    async def record_routing_stats(self) -> dict:
        """Serve calls this every request_routing_stats_period_s; the router reads the result. The adapters'
        content hashes go to the catalog (the start-up adapters' are known only here; a restarted catalog
        learns them again within a period)."""
        stats = await self.engine.stats()
        resident = stats.lora.resident if stats.lora is not None else ()
        slot = {a.content_hash for a in resident if a.in_slot}
        host = {a.content_hash for a in resident} - slot
        await self.catalog.record_hashes.remote(await self._content_hashes())
        return {"replica": self.id, "slot": sorted(slot), "host": sorted(host), "running": stats.running,
                "waiting": stats.waiting, "max_num_seqs": self.config.max_num_seqs, "version": self.version}

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped is replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"the engine has stopped: {self.engine.error!r}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
