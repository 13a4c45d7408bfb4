"""Where adapters live: a slot LRU (max_loras, the stacked weights the model reads) over a host LRU
(max_cpu_loras validated copies in memory) over disk. Slots used by the step being run are pinned."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from loraserve.config import LoRAConfig
from loraserve.layers.linear import Linear
from loraserve.lora.adapter import LoRAAdapter, LoRAError, LoRATargetSpec, load_adapter
from loraserve.lora.layers import LoRASlots
from loraserve.lora.request import LoRARequest


@dataclass
class LoRAStats:
    slot_hits: int = 0
    slot_loads: int = 0
    slot_evictions: int = 0
    host_hits: int = 0
    host_loads: int = 0
    host_evictions: int = 0
    load_seconds: float = 0.0  # total time reading and validating adapters from disk


class LoRAManager:
    def __init__(self, linears: dict[str, tuple[Linear, str]], config: LoRAConfig, dtype: torch.dtype,
                 model_name: str) -> None:
        """`linears`: checkpoint module name -> (packed Linear, part), as CausalLM.linear_modules gives."""
        self.config = config
        self.dtype = dtype
        self.linears = linears
        self.spec = LoRATargetSpec({name: (linear.in_features, linear.parts[part])
                                    for name, (linear, part) in linears.items()}, model_name)
        self.layer_slots: list[LoRASlots] = []
        for linear in dict.fromkeys(linear for linear, _ in linears.values()):
            linear.lora = LoRASlots(linear, config.max_loras, config.max_lora_rank, dtype)
            self.layer_slots.append(linear.lora)
        self.slot_owner: list[int | None] = [None] * config.max_loras  # lora_int_id per slot
        self._slot_lru: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recent first
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._known: dict[int, LoRARequest] = {}
        self._lock = threading.Lock()  # host cache is filled from request threads, read by the step loop
        self.stats = LoRAStats()

    # ---- host cache ---------------------------------------------------------------------------

    def check_identity(self, request: LoRARequest) -> None:
        """The same lora_int_id must always name the same adapter."""
        known = self._known.get(request.lora_int_id)
        if known is not None and (known.lora_path, known.lora_name) != (request.lora_path, request.lora_name):
            raise LoRAError(
                f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} at {known.lora_path!r}; "
                f"give {request.lora_name!r} ({request.lora_path!r}) an id of its own")

    def prepare(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter validated in host memory, read from disk if it is not cached. Thread-safe; the disk
        read happens outside the lock so other adapters are served meanwhile."""
        with self._lock:
            self.check_identity(request)
            adapter = self._host.get(request.lora_int_id)
            if adapter is not None:
                self._host.move_to_end(request.lora_int_id)
                self.stats.host_hits += 1
                return adapter
        start = time.perf_counter()
        adapter = load_adapter(request, self.spec, self.config.max_lora_rank, self.dtype)
        with self._lock:
            self.check_identity(request)
            self.stats.host_loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            self._known[request.lora_int_id] = request
            self._host[request.lora_int_id] = adapter
            while len(self._host) > self.config.max_cpu_loras:
                self._host.popitem(last=False)
                self.stats.host_evictions += 1
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter everywhere (it may be loaded again later, under any id)."""
        with self._lock:
            found = self._known.pop(lora_int_id, None) is not None
            self._host.pop(lora_int_id, None)
        slot = self._slot_lru.pop(lora_int_id, None)
        if slot is not None:
            self._clear(slot)
        return found

    @property
    def host_adapters(self) -> list[int]:
        with self._lock:
            return list(self._host)

    # ---- slots ----------------------------------------------------------------------------------

    def activate(self, requests: Iterable[LoRARequest]) -> tuple[dict[int, int], dict[int, LoRAError]]:
        """Put every adapter of the step into a slot. Returns lora_int_id -> slot, and the adapters that
        could not be loaded (their requests fail; the others run)."""
        wanted = {r.lora_int_id: r for r in requests}
        slots: dict[int, int] = {}
        failed: dict[int, LoRAError] = {}
        for lora_id in wanted:
            if lora_id in self._slot_lru:
                self._slot_lru.move_to_end(lora_id)
                slots[lora_id] = self._slot_lru[lora_id]
                self.stats.slot_hits += 1
        for lora_id, request in wanted.items():
            if lora_id in slots:
                continue
            try:
                adapter = self.prepare(request)
            except LoRAError as exc:
                failed[lora_id] = exc
                continue
            slot = self._free_slot(pinned=set(slots.values()))
            self._load_slot(slot, adapter)
            self._slot_lru[lora_id] = slot
            slots[lora_id] = slot
        return slots, failed

    def _free_slot(self, pinned: set[int]) -> int:
        for slot, owner in enumerate(self.slot_owner):
            if owner is None:
                return slot
        for lora_id, slot in self._slot_lru.items():  # least recently used first
            if slot not in pinned:
                del self._slot_lru[lora_id]
                self._clear(slot)
                self.stats.slot_evictions += 1
                return slot
        raise RuntimeError("more adapters in one step than max_loras; the scheduler should prevent this")

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        parts: dict[Linear, dict] = defaultdict(dict)
        for module, weights in adapter.modules.items():
            linear, part = self.linears[module]
            parts[linear][part] = weights
        for layer in self.layer_slots:
            layer.set_slot(slot, parts.get(layer.linear, {}))
        self.slot_owner[slot] = adapter.int_id
        self.stats.slot_loads += 1

    def _clear(self, slot: int) -> None:
        for layer in self.layer_slots:
            layer.clear_slot(slot)
        self.slot_owner[slot] = None
