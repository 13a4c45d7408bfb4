"""Validated adapters in host memory, by lora_int_id, and the rules that make an id mean one adapter.

Lifecycle (docs/architecture.md):
- `acquire` is called once per request, off the step thread, before the request enters the engine: a cached
  adapter is pinned at once, a cold one is read and validated from disk (concurrent requests for the same
  cold id share one read). The request holds the pin until it ends, so the step thread never reads a file.
- An id is bound, at its first load, to its name, its resolved folder and the content hash of its files.
  Another folder or name under the same id is refused; files changed on disk under a bound id are refused
  when they would be read again (after an eviction) instead of being served in place of the old weights.
- Unpinned adapters are kept up to `capacity`, least recently used evicted first; pinned ones always stay.
- `remove` unbinds an id at once: new requests for it fail with AdapterRemovedError, requests that hold it
  finish on its weights, and when the last lets go its content is reported by `take_dropped` (so its slot
  can be freed). `add` binds an id anew, also one that was removed.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from loraserve.errors import AdapterRemovedError, LoRAError
from loraserve.lora.adapter import LoRAAdapter, resolve_adapter_path
from loraserve.lora_request import LoRARequest

# upper bounds (seconds) of the load-time histogram's buckets; a last, unbounded bucket follows
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class HostCacheStats:
    hits: int = 0  # requests whose adapter was in memory
    loads: int = 0  # requests whose adapter was read from disk
    evictions: int = 0
    load_seconds: float = 0.0  # total time reading and validating adapters from disk
    cached: int = 0  # adapters in host memory now (pinned or not)
    # (upper bound in seconds, loads in that bucket, not cumulative) per LOAD_BUCKETS bound, then (inf, loads
    # above the last): a histogram of single load times can be exported, not only their total
    load_buckets: tuple[tuple[float, int], ...] = field(
        default=tuple((bound, 0) for bound in (*LOAD_BUCKETS, math.inf)))


@dataclass(frozen=True)
class _Binding:
    name: str
    path: str  # as the binding request spelled it
    folder: Path  # resolved
    content_hash: str


class HostCache:
    def __init__(self, load: Callable[[LoRARequest, Path], LoRAAdapter], capacity: int) -> None:
        """`load(request, resolved folder)` reads and validates an adapter (LoRAError if it cannot be served)."""
        self._load = load
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, LoRAAdapter] = OrderedDict()  # the current adapter of each id, LRU first
        self._pins: dict[LoRAAdapter, int] = {}
        self._bindings: dict[int, _Binding] = {}
        self._removed: set[int] = set()
        self._loading: dict[int, Future] = {}
        self._dropped: list[str] = []
        self._stats = HostCacheStats()

    # ---- requests ---------------------------------------------------------------------------------

    def acquire(self, request: LoRARequest) -> LoRAAdapter:
        """The request's adapter, pinned; release it when the request ends. Thread-safe; a disk read
        happens outside the lock, so other adapters are served meanwhile."""
        folder = self._folder(request)
        while True:
            with self._lock:
                adapter = self._cached(request, folder)
                if adapter is not None:
                    self._pins[adapter] = self._pins.get(adapter, 0) + 1
                    self._stats.hits += 1
                    return adapter
                pending = self._loading.get(request.lora_int_id)
                if pending is None:
                    pending = self._loading[request.lora_int_id] = Future()
                    break
            pending.result()  # another thread is reading this id: wait for it, then take its copy
        try:
            start = time.perf_counter()
            adapter = self._load(request, folder)
            with self._lock:
                del self._loading[request.lora_int_id]
                self._insert(request, folder, adapter, time.perf_counter() - start)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(request.lora_int_id, None)
            pending.set_exception(exc)
            raise
        pending.set_result(adapter)
        return adapter

    def peek(self, request: LoRARequest) -> tuple[LoRAAdapter | None, Path]:
        """The request's adapter if it is in memory (not pinned, not counted as a use), and its folder;
        raises what acquire would for a removed id or a clashing binding."""
        folder = self._folder(request)
        with self._lock:
            return self._cached(request, folder), folder

    def release(self, adapter: LoRAAdapter) -> None:
        with self._lock:
            users = self._pins[adapter] - 1
            if users:
                self._pins[adapter] = users
                return
            del self._pins[adapter]
            if self._entries.get(adapter.int_id) is not adapter:  # removed while in use
                self._drop(adapter)
            self._evict()

    # ---- registration -----------------------------------------------------------------------------

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Bind the id (anew if it was removed) and cache its adapter, unpinned."""
        with self._lock:
            if request.lora_int_id in self._removed:
                self._removed.discard(request.lora_int_id)
                self._bindings.pop(request.lora_int_id, None)
        adapter = self.acquire(request)
        self.release(adapter)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Unbind an id; False if it was not bound."""
        with self._lock:
            found = self._bindings.pop(lora_int_id, None) is not None
            self._removed.add(lora_int_id)
            adapter = self._entries.pop(lora_int_id, None)
            if adapter is not None and adapter not in self._pins:
                self._drop(adapter)
        return found

    def bound_ids(self) -> list[int]:
        with self._lock:
            return list(self._bindings)

    def cached_ids(self) -> list[int]:
        with self._lock:
            return list(self._entries)

    def resident(self) -> list[LoRAAdapter]:
        """The adapters a new request would find in memory (pinned or not), least recently used first; not
        those removed that running requests still hold."""
        with self._lock:
            return list(self._entries.values())

    def take_dropped(self) -> list[str]:
        """Content hashes of removed adapters that no request uses any more (each reported once)."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return dropped

    def stats(self) -> HostCacheStats:
        with self._lock:
            return replace(self._stats, cached=len(set(self._entries.values()) | set(self._pins)))

    def _folder(self, request: LoRARequest) -> Path:
        """The request's resolved folder. A path spelled as when the id was bound is not resolved again, so
        a cached adapter is served without touching the file system (even after its folder was deleted)."""
        with self._lock:
            self._check_not_removed(request)
            binding = self._bindings.get(request.lora_int_id)
        if binding is not None and binding.path == request.lora_path:
            return binding.folder
        return resolve_adapter_path(request.lora_path)

    # ---- under the lock ---------------------------------------------------------------------------

    def _cached(self, request: LoRARequest, folder: Path) -> LoRAAdapter | None:
        lora_id = request.lora_int_id
        self._check_not_removed(request)
        binding = self._bindings.get(lora_id)
        if binding is not None and (binding.name, binding.folder) != (request.lora_name, folder):
            raise LoRAError(
                f"lora_int_id {lora_id} already names adapter {binding.name!r} at {str(binding.folder)!r}; "
                f"give {request.lora_name!r} ({request.lora_path!r}) an id of its own")
        adapter = self._entries.get(lora_id)
        if adapter is not None:
            self._entries.move_to_end(lora_id)
        return adapter

    def _check_not_removed(self, request: LoRARequest) -> None:
        if request.lora_int_id in self._removed:
            raise AdapterRemovedError(
                f"adapter {request.lora_name!r} (lora_int_id {request.lora_int_id}) was removed; add it again, or "
                f"give it a new lora_int_id")

    def _insert(self, request: LoRARequest, folder: Path, adapter: LoRAAdapter, seconds: float) -> None:
        lora_id = request.lora_int_id
        if lora_id in self._removed:
            raise AdapterRemovedError(f"adapter {request.lora_name!r} (lora_int_id {lora_id}) was removed while "
                                      f"it was being loaded")
        binding = self._bindings.get(lora_id)
        if binding is not None and binding.content_hash != adapter.content_hash:
            raise LoRAError(
                f"the files of adapter {request.lora_name!r} in {str(folder)!r} changed since it was loaded as "
                f"lora_int_id {lora_id} (content {binding.content_hash[:12]} -> {adapter.content_hash[:12]}); "
                f"one id serves one content: load the new files under a new lora_int_id, or reload the adapter "
                f"(server: POST /v1/load_lora_adapter with load_inplace=true)")
        self._bindings[lora_id] = _Binding(request.lora_name, request.lora_path, folder, adapter.content_hash)
        self._entries[lora_id] = adapter
        self._pins[adapter] = self._pins.get(adapter, 0) + 1
        self._stats.loads += 1
        self._stats.load_seconds += seconds
        index = bisect.bisect_left(LOAD_BUCKETS, seconds)  # bucket i: seconds <= LOAD_BUCKETS[i]
        self._stats.load_buckets = tuple((bound, count + (i == index))
                                         for i, (bound, count) in enumerate(self._stats.load_buckets))
        self._evict()

    def _evict(self) -> None:
        for lora_id in [i for i, a in self._entries.items() if a not in self._pins]:
            if len(self._entries) <= self.capacity:
                return
            del self._entries[lora_id]
            self._stats.evictions += 1

    def _drop(self, adapter: LoRAAdapter) -> None:
        """A removed adapter has no user left; report its content unless another copy is still in memory."""
        in_memory = set(self._entries.values()) | set(self._pins)
        if all(other.content_hash != adapter.content_hash for other in in_memory):
            self._dropped.append(adapter.content_hash)
