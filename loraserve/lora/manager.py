"""Where adapters live: slots beside the model (max_loras, the stacked weights the model reads) over host
copies (max_cpu_loras unpinned, plus every adapter a request holds) over disk.

Thread use: `acquire`, `release`, `add` and `remove` may be called from any thread; `activate` and `stats`
only from the step thread, which never reads a file (every adapter it sees was acquired beforehand).

A cold adapter's files are read in the thread that acquires it; parsing and checking them (CPU work, most
of it holding the GIL) runs through `run_cpu_work`: inline by default. When the engine's compute threads
fill every core, running it beside a step slows that step several times more than the work takes (a
preempted compute thread holds up the whole parallel region, and the step thread waits for the GIL at
every op), so the async engine then hands it to its step thread, between two steps.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from loraserve.config import LoRAConfig
from loraserve.lora.adapter import LoRAAdapter, LoRATargetSpec, load_adapter
from loraserve.lora.adapter_files import read_adapter_files
from loraserve.lora.host_cache import HostCache, HostCacheStats
from loraserve.lora.report import adapter_report
from loraserve.lora.slots import AdapterSlots, SlotStats
from loraserve.lora_request import LoRARequest
from loraserve.model.causal_lm import CausalLM
from loraserve.model.lora_targets import enable_lora

T = TypeVar("T")


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter a request would find in memory, for metrics and routers (which send requests where their
    adapter already is)."""

    name: str  # the LoRARequest's lora_name it was loaded under
    content_hash: str  # the adapter's content hash (LoRAAdapter.content_hash)
    rank: int
    in_slot: bool  # True: in a slot beside the model ("gpu" level); False: host memory only ("cpu")


@dataclass
class LoRAStats:
    host: HostCacheStats
    slots: SlotStats
    num_slots: int
    slots_used: int
    # every adapter in host memory (pinned or not), one per (name, content hash), sorted by name; an adapter
    # evicted from host memory is not listed even while its slot is not yet reused (a request for it reads
    # the disk again)
    resident: tuple[ResidentAdapter, ...] = ()


class LoRAManager:
    def __init__(self, model: CausalLM, config: LoRAConfig, dtype: torch.dtype, model_name: str) -> None:
        """Adapters for every tensor of `model` they may act on (model/lora_targets.py)."""
        self.config = config
        self.spec = LoRATargetSpec.of_model(model, model_name, config.lora_extra_vocab_size,
                                            config.long_lora_scaling_factors, config.max_lora_saved_mb)
        self.model, self.dtype = model, dtype
        self.run_cpu_work: Callable[[Callable[[], T]], T] = _inline
        self.host = HostCache(self._load, config.max_cpu_loras)
        self.slots = AdapterSlots(enable_lora(model, config.max_loras, config.max_lora_rank, dtype,
                                              config.lora_extra_vocab_size), config.max_loras)

    def _load(self, request: LoRARequest, folder: Path) -> LoRAAdapter:
        files = read_adapter_files(folder, request.lora_name, self.config.max_lora_file_mb)
        return self.run_cpu_work(lambda: load_adapter(request, self.spec, self.config.max_lora_rank, self.dtype,
                                                      folder, base=self.model, files=files))

    def acquire(self, request: LoRARequest) -> LoRAAdapter:
        """The request's adapter in host memory, pinned until `release` (reads the disk if it is cold)."""
        return self.host.acquire(request)

    def report(self, request: LoRARequest) -> dict:
        """The adapter's load report (lora/report.py), reading and binding it if it is not in memory."""
        adapter, _ = self.host.peek(request)
        return adapter_report(adapter if adapter is not None else self.host.add(request), self.spec)

    def release(self, adapter: LoRAAdapter) -> None:
        self.host.release(adapter)

    def add(self, request: LoRARequest) -> LoRAAdapter:
        return self.host.add(request)

    def remove(self, lora_int_id: int) -> bool:
        return self.host.remove(lora_int_id)

    def activate(self, adapters: Iterable[LoRAAdapter]) -> dict[str, int]:
        """Slots for this step's adapters (content hash -> slot), after freeing those of removed adapters."""
        self.slots.free(self.host.take_dropped())
        return self.slots.activate(adapters)

    def stats(self) -> LoRAStats:
        self.slots.free(self.host.take_dropped())
        in_slots = set(self.slots.owner)
        resident = {ResidentAdapter(adapter.name, adapter.content_hash, adapter.max_rank,
                                    adapter.content_hash in in_slots) for adapter in self.host.resident()}
        return LoRAStats(self.host.stats(), replace(self.slots.stats), len(self.slots.owner), self.slots.num_used,
                         tuple(sorted(resident, key=lambda r: (r.name, r.content_hash))))


def _inline(work: Callable[[], T]) -> T:
    return work()
