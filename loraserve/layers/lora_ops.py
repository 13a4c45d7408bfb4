"""The LoRA hot path: stacked adapter slots of one linear layer, and the batched shrink (x·Aᵀ) then expand
(·B) over a flat token batch.

Slot s holds one adapter's A and B for every part of the layer (q/k/v of a packed qkv, gate/up...). The
targeted parts' A matrices are stacked row-wise so one shrink serves all of them; B is block-diagonal over
the parts so one expand writes every part's output columns. A slot uses only its first widths[slot] rows,
so the work follows the adapter's own rank rather than max_lora_rank.

The model runner orders sequences by slot, so each adapter's tokens form contiguous runs. On CPU one C++
call per layer does every run of up to LoRABatch.KERNEL_MAX_RUN tokens, prefill chunks and decode tokens of
all adapters alike (csrc/lora_segments.cpp: tiny matmuls pay a fixed cost that dwarfs their arithmetic, and
the kernel reads each adapter's weights once per step); longer runs get a pair of matmuls each. Elsewhere
prefill chunks get a pair of matmuls each and the decode tokens are gathered into a [slots, longest run]
block done with two batched matmuls for all adapters at once. Either way the number of calls does not grow
with the number of adapters.
Tokens without an adapter cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.cpu_kernels import lora_module
from loraserve.layers.forward_batch import LoRABatch, LoRASegment


@dataclass
class SlotLayout:
    """lora_a: [slots, W, in], lora_b: [slots, W, out] with W = parts * max_rank; part_rows [slots, parts, 2]
    and part_cols [parts, 2] (int64) give each part's rank rows and output columns; `part_names` are the
    layer's parts in stacking order (what `fill` is given weights by)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    widths: list[int]
    part_rows: torch.Tensor
    part_cols: torch.Tensor
    part_names: tuple[str, ...] = ()

    @classmethod
    def allocate(cls, parts: dict[str, int], in_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> SlotLayout:
        """Empty slots for a layer whose `parts` (name -> output features) are stacked in that order."""
        out_features = sum(parts.values())
        bounds, start = [], 0
        for size in parts.values():
            bounds.append([start, start + size])
            start += size
        return cls(
            lora_a=torch.zeros(num_slots, len(parts) * max_rank, in_features, dtype=dtype, device=device),
            lora_b=torch.zeros(num_slots, len(parts) * max_rank, out_features, dtype=dtype, device=device),
            widths=[0] * num_slots,
            part_rows=torch.zeros(num_slots, len(parts), 2, dtype=torch.long, device=device),
            part_cols=torch.tensor(bounds, dtype=torch.long, device=device),
            part_names=tuple(parts),
        )

    def fill(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter into `slot`: part name -> (A [r, in], B [out_part, r], scaling folded in). Parts
        left out get no rows, so they cost nothing. Runs inside a step, so it touches only what the old and
        the new adapter occupy."""
        self.clear(slot)
        offset, rows = 0, [[0, 0] for _ in self.part_names]
        for index, name in enumerate(self.part_names):
            if name not in weights:
                continue
            lora_a, lora_b = weights[name]
            rank = lora_a.shape[0]
            col_start, col_end = self.part_cols[index].tolist()
            self.lora_a[slot, offset:offset + rank].copy_(lora_a)
            self.lora_b[slot, offset:offset + rank, col_start:col_end].copy_(lora_b.T)
            rows[index] = [offset, offset + rank]
            offset += rank
        self.part_rows[slot] = torch.tensor(rows, dtype=torch.long)
        self.widths[slot] = offset

    def clear(self, slot: int) -> None:
        """Zero the slot's rows. In B only each part's own block is non-zero (the rest of its rows stays
        zero from allocation on), so only those blocks are zeroed."""
        width = self.widths[slot]
        if width == 0:
            return
        self.lora_a[slot, :width].zero_()
        for (row_start, row_end), (col_start, col_end) in zip(self.part_rows[slot].tolist(),
                                                               self.part_cols.tolist(), strict=True):
            if row_end > row_start:
                self.lora_b[slot, row_start:row_end, col_start:col_end].zero_()
        self.part_rows[slot].zero_()
        self.widths[slot] = 0


def add_lora(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """y += (x · A[slot]ᵀ) · B[slot] per token, in place."""
    lora_a, lora_b, widths = layout.lora_a, layout.lora_b, layout.widths
    kernel = lora_module() if y.device.type == "cpu" and x.dtype == lora_a.dtype == y.dtype else None
    if kernel is not None:
        if batch.kernel_runs is not None:
            kernel.lora_add_runs(y, x.contiguous(), lora_a, lora_b, batch.kernel_runs, layout.part_rows,
                                 layout.part_cols)
        _add_segments(y, x, layout, batch.long_segments)
        return
    _add_segments(y, x, layout, batch.segments)
    group = batch.grouped
    if group is None:
        return
    width = max(widths[s] for s in group.slot_list)
    if width == 0:
        return
    if group.slot_range is not None:
        a, b = lora_a[:group.slot_range, :width], lora_b[:group.slot_range, :width]
    else:
        a, b = lora_a[group.slots, :width], lora_b[group.slots, :width]
    xs = _to(x[group.index], lora_a)  # [S, L, in]
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b) * group.mask  # [S, L, out]
    y.index_add_(0, group.index.view(-1), _to(delta.view(-1, delta.shape[-1]), y))


def _add_segments(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, segments: list[LoRASegment]) -> None:
    """One pair of matmuls per long run."""
    for seg in segments:
        width = layout.widths[seg.slot]
        if width:
            a, b = layout.lora_a[seg.slot, :width], layout.lora_b[seg.slot, :width]
            y[seg.start:seg.end] += _to(_to(x[seg.start:seg.end], a) @ a.T @ b, y)


def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)
