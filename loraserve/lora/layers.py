"""Adapter slots of one (possibly packed) linear layer.

Slot s holds one adapter's A and B for every part of the layer (q/k/v of a packed qkv, gate/up...). The
targeted parts' A matrices are stacked row-wise so one shrink serves all of them; B is block-diagonal over
the parts so one expand writes every part's output columns.
"""
from __future__ import annotations

import torch

from loraserve.layers.linear import Linear
from loraserve.lora.adapter import LoRAModuleWeights
from loraserve.lora.ops import LoRABatch, SlotLayout, add_lora


class LoRASlots:
    def __init__(self, linear: Linear, num_slots: int, max_rank: int, dtype: torch.dtype) -> None:
        self.linear = linear
        num_parts = len(linear.parts)
        device = linear.weight.device
        self.lora_a = torch.zeros(num_slots, num_parts * max_rank, linear.in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots, num_parts * max_rank, linear.out_features, dtype=dtype, device=device)
        self.widths = [0] * num_slots
        self.part_rows = torch.zeros(num_slots, num_parts, 2, dtype=torch.long, device=device)
        bounds = [linear.part_slice(name) for name in linear.parts]
        part_cols = torch.tensor([[b.start, b.stop] for b in bounds], dtype=torch.long, device=device)
        self.layout = SlotLayout(self.lora_a, self.lora_b, self.widths, self.part_rows, part_cols)

    def set_slot(self, slot: int, parts: dict[str, LoRAModuleWeights]) -> None:
        """Load an adapter's weights for this layer: `parts` maps part name -> weights. Targeted parts are
        packed one after another, so the slot's width is the sum of their ranks and untargeted parts cost
        nothing."""
        self.clear_slot(slot)
        offset = 0
        for index, name in enumerate(self.linear.parts):
            weights = parts.get(name)
            if weights is None:
                continue
            rows = slice(offset, offset + weights.rank)
            self.lora_a[slot, rows].copy_(weights.lora_a)
            self.lora_b[slot, rows, self.linear.part_slice(name)].copy_(weights.lora_b.T)
            self.part_rows[slot, index] = torch.tensor([rows.start, rows.stop])
            offset += weights.rank
        self.widths[slot] = offset

    def clear_slot(self, slot: int) -> None:
        width = self.widths[slot]
        self.lora_a[slot, :width].zero_()
        self.lora_b[slot, :width].zero_()
        self.part_rows[slot].zero_()
        self.widths[slot] = 0

    def add_to(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> None:
        add_lora(y, x, self.layout, batch)
