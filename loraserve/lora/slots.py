"""Which adapter sits in which of the max_loras slots beside the model, and filling a slot's A/B in every
adapted layer. Slots are keyed by content hash, so ids that name the same files share one slot. Used only
by the step thread; the adapters it is given are already in host memory."""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from loraserve.layers.linear import Linear
from loraserve.layers.lora_ops import SlotLayout
from loraserve.layers.moe import ExpertSlots, FusedExperts
from loraserve.lora.adapter import LoRAAdapter


@dataclass
class SlotStats:
    hits: int = 0  # adapters of a step that were already in a slot (counted per step)
    loads: int = 0
    evictions: int = 0


class AdapterSlots:
    def __init__(self, linears: dict[str, tuple[Linear, str]], experts: dict[str, tuple[FusedExperts, str]],
                 num_slots: int, max_rank: int, dtype: torch.dtype) -> None:
        """`linears`: checkpoint module name -> (packed Linear, part), as CausalLM.linear_modules gives;
        `experts`: fused expert tensor name -> (FusedExperts, tensor), as CausalLM.expert_tensors gives."""
        self.linears = linears
        distinct = dict.fromkeys(linear for linear, _ in linears.values())
        self.layouts: dict[Linear, SlotLayout] = {
            linear: linear.enable_lora(num_slots, max_rank, dtype) for linear in distinct}
        self.expert_slots: dict[str, ExpertSlots] = {}
        for module in dict.fromkeys(module for module, _ in experts.values()):
            module.enable_lora(num_slots, max_rank, dtype)
        for name, (module, tensor) in experts.items():
            self.expert_slots[name] = module.lora[tensor]
        self.owner: list[str | None] = [None] * num_slots  # content hash per slot
        self._lru: OrderedDict[str, int] = OrderedDict()  # content hash -> slot, least recently used first
        self.stats = SlotStats()

    @property
    def num_used(self) -> int:
        return sum(owner is not None for owner in self.owner)

    def activate(self, adapters: Iterable[LoRAAdapter]) -> dict[str, int]:
        """Put every adapter of the step into a slot; content hash -> slot. The scheduler admits at most
        as many distinct adapters as there are slots."""
        wanted = {adapter.content_hash: adapter for adapter in adapters}
        slots: dict[str, int] = {}
        for key in wanted:
            if key in self._lru:
                self._lru.move_to_end(key)
                slots[key] = self._lru[key]
                self.stats.hits += 1
        for key, adapter in wanted.items():
            if key not in slots:
                slot = self._free_slot(pinned=set(slots.values()))
                self._fill(slot, adapter)
                self._lru[key] = slot
                slots[key] = slot
        return slots

    def free(self, content_hashes: Iterable[str]) -> None:
        """Clear the slots of adapters that left host memory for good (removed, and no request uses them)."""
        for key in content_hashes:
            slot = self._lru.pop(key, None)
            if slot is not None:
                self._clear(slot)

    def _free_slot(self, pinned: set[int]) -> int:
        for slot, owner in enumerate(self.owner):
            if owner is None:
                return slot
        for key, slot in self._lru.items():  # least recently used first
            if slot not in pinned:
                del self._lru[key]
                self._clear(slot)
                self.stats.evictions += 1
                return slot
        raise RuntimeError("more adapters in one step than max_loras; the scheduler should prevent this")

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        parts: dict[Linear, dict[str, tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
        for module, weights in adapter.modules.items():
            if module in self.linears:
                linear, part = self.linears[module]
                parts[linear][part] = (weights.lora_a, weights.lora_b)
        for linear, layout in self.layouts.items():
            layout.fill(slot, parts.get(linear, {}))
        for name, expert_slots in self.expert_slots.items():
            weights = adapter.modules.get(name)
            expert_slots.fill(slot, None if weights is None else (weights.lora_a, weights.lora_b))
        self.owner[slot] = adapter.content_hash
        self.stats.loads += 1

    def _clear(self, slot: int) -> None:
        for layout in [*self.layouts.values(), *self.expert_slots.values()]:
            layout.clear(slot)
        self.owner[slot] = None
