"""Which adapter sits in which of the max_loras slots beside the model, and filling a slot everywhere the
adapter acts: rank factors, DoRA factors and bias deltas into each tensor's slot layout, whole tables and
trained rows into the vocabulary tables' replacements. Slots are keyed by content hash, so ids that name the
same files share one slot. Used only by the step thread; the adapters it is given are already in host memory.

Slot memory: the rank factors of linear and expert layers are allocated for max_lora_rank at start (their
size is fixed and logged); the embedding / LM-head factors when the first adapter using them arrives; whole
tables (modules_to_save, added tokens) while their adapter holds a slot. `nbytes` reports what is held."""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from loraserve.layers.lora_ops import SlotLayout, SlotPart
from loraserve.lora.adapter import LoRAAdapter
from loraserve.model.lora_targets import HEAD_WEIGHT, LoRASlots


@dataclass
class SlotStats:
    hits: int = 0  # adapters of a step that were already in a slot (counted per step)
    loads: int = 0
    evictions: int = 0


class AdapterSlots:
    def __init__(self, slots: LoRASlots, num_slots: int) -> None:
        """`slots`: where each adapter module goes, as model.lora_targets.enable_lora gives it."""
        self.targets = slots.targets
        self.tables = slots.tables
        self.norms = slots.norms
        self.norm_modules = list({id(module): module for module, _ in self.norms.values()}.values())
        self.tied = slots.tied
        self.vocab_size = slots.vocab_size
        self.layouts: list[SlotLayout] = list({id(t.layout): t.layout for t in self.targets.values()}.values())
        self.owner: list[str | None] = [None] * num_slots  # content hash per slot
        self._lru: OrderedDict[str, int] = OrderedDict()  # content hash -> slot, least recently used first
        self.stats = SlotStats()

    @property
    def num_used(self) -> int:
        return sum(owner is not None for owner in self.owner)

    @property
    def nbytes(self) -> int:
        """Bytes the slots hold now: every layout's factors and output maps, and the whole tables."""
        norms = sum(t.nbytes for norm in self.norm_modules for params in norm.slot_params.values()
                    for t in params.values())
        return sum(layout.nbytes for layout in self.layouts) + sum(t.nbytes for t in self.tables.values()) + norms

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
        parts: dict[int, dict[str, SlotPart]] = defaultdict(dict)  # id(layout) -> part name -> what goes there
        trained_bias = {name.removesuffix(".bias"): tensor.float() for name, tensor in adapter.saved.items()
                        if name.endswith(".bias") and name.removesuffix(".bias") in self.targets}
        for module, weights in adapter.modules.items():
            target = self.targets[module]
            # DoRA scales the layer's output without the bias the served layer added (a trained bias is a shift)
            base_bias = target.bias.float() if weights.magnitude is not None and target.bias is not None else None
            parts[id(target.layout)][target.part] = SlotPart(
                weights.lora_a, weights.lora_b, weights.magnitude, weights.dora_norms, base_bias, weights.bias)
        for module, bias in trained_bias.items():  # the difference to the base's, whatever the coefficient
            target = self.targets[module]
            part = parts[id(target.layout)].setdefault(target.part, SlotPart())
            part.fixed_shift = bias - target.bias.float()
        tables: dict[str, dict] = defaultdict(dict)
        for name, tensor in adapter.saved.items():
            module, _, param = name.rpartition(".")
            if name in self.tables:
                tables[name]["table"] = tensor
            elif name in self.norms:
                norm, param = self.norms[name]
                norm.slot_params.setdefault(slot, {})[param] = tensor
            elif not (param == "bias" and module in trained_bias):
                raise RuntimeError(f"adapter {adapter.name!r}: no slot holds {name!r}; the adapter reader should "
                                   f"have refused it")
        for name, rows in adapter.token_rows.items():
            tables[name]["rows"] = (rows.ids, rows.rows)
        embed = next(name for name in self.tables if name != HEAD_WEIGHT)
        if self.tied and embed in adapter.token_rows and HEAD_WEIGHT not in adapter.token_rows:
            rows = adapter.token_rows[embed]  # the head reads the embedding's rows
            tables[HEAD_WEIGHT]["rows"] = (rows.ids, rows.rows)
        if adapter.added_tokens:
            tables[HEAD_WEIGHT]["vocab"] = self.vocab_size + adapter.added_tokens
        for layout in self.layouts:
            layout.fill(slot, parts.get(id(layout), {}))
        for name, table in self.tables.items():
            table.fill(slot, **tables.get(name, {}))
        self.owner[slot] = adapter.content_hash
        self.stats.loads += 1

    def _clear(self, slot: int) -> None:
        for layout in self.layouts:
            layout.clear(slot)
        for table in self.tables.values():
            table.clear(slot)
        for norm in self.norm_modules:
            norm.slot_params.pop(slot, None)
        self.owner[slot] = None

