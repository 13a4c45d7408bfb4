"""Batched LoRA on a flat token batch: shrink (x·Aᵀ) then expand (·B).

The model runner orders sequences by adapter slot, so each adapter's tokens form contiguous runs. Long
runs (prefill chunks) get one pair of matmuls each. Decode tokens, one per sequence, are many short runs:
on CPU they go to one C++ call for all adapters (layers/csrc/lora_segments.cpp: tiny matmuls pay a fixed
cost that dwarfs their arithmetic); elsewhere they are gathered into a [slots, longest run] block and done
with two batched matmuls for all adapters at once. Either way the number of calls does not grow with the
number of adapters. Tokens without an adapter cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.cpu_kernels import lora_module


@dataclass(frozen=True)
class LoRASegment:
    slot: int
    start: int
    end: int


@dataclass
class GroupedTokens:
    """Short runs gathered per slot: row s of `index` lists the tokens of slot `slots[s]`, right-padded
    with that run's first token; `mask` zeroes the padding's contribution. `runs` lists the same tokens as
    (slot, begin, end) rows for the CPU kernel."""

    runs: torch.Tensor  # [N, 3] int64
    slot_list: list[int]
    slots: torch.Tensor  # [S] int64, the same on the device
    index: torch.Tensor  # [S, L] int64 rows of the flat batch
    mask: torch.Tensor  # [S, L, 1] bool, True for real tokens
    slot_range: int | None  # k when slots == 0..k-1, so weights can be sliced instead of gathered


@dataclass
class LoRABatch:
    segments: list[LoRASegment]  # long runs, one matmul pair each
    grouped: GroupedTokens | None  # short runs, batched together

    @classmethod
    def build(cls, token_slots: list[int], grouped_from: int, device: torch.device) -> LoRABatch | None:
        """Runs of equal slot in token order (slot -1, no adapter, makes none). Runs starting at or after
        token `grouped_from` (the decode tokens) are batched; earlier runs stay segments. None if no
        token has an adapter."""
        segments: list[LoRASegment] = []
        short: dict[int, list[int]] = {}
        runs: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(token_slots) + 1):
            if i == len(token_slots) or token_slots[i] != token_slots[start] or i == grouped_from:
                slot = token_slots[start]
                if slot >= 0:
                    if start >= grouped_from:
                        short.setdefault(slot, []).extend(range(start, i))
                        runs.append((slot, start, i))
                    else:
                        segments.append(LoRASegment(slot, start, i))
                start = i
        if not segments and not short:
            return None
        return cls(segments, _group(short, runs, device) if short else None)


def _group(tokens: dict[int, list[int]], runs: list[tuple[int, int, int]], device: torch.device) -> GroupedTokens:
    slots = sorted(tokens)
    width = max(len(rows) for rows in tokens.values())
    index = [tokens[s] + [tokens[s][0]] * (width - len(tokens[s])) for s in slots]
    mask = [[True] * len(tokens[s]) + [False] * (width - len(tokens[s])) for s in slots]
    contiguous = slots == list(range(len(slots)))
    return GroupedTokens(
        runs=torch.tensor(runs, dtype=torch.long, device=device),
        slot_list=slots,
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        index=torch.tensor(index, dtype=torch.long, device=device),
        mask=torch.tensor(mask, device=device).unsqueeze(-1),
        slot_range=len(slots) if contiguous else None,
    )


@dataclass
class SlotLayout:
    """Where each adapter sits in the stacked weights. lora_a: [slots, W, in], lora_b: [slots, W, out]; a
    slot uses only its first widths[slot] rows (the rest are zero), so the work follows the adapter's own
    rank rather than max_lora_rank. part_rows [slots, parts, 2] and part_cols [parts, 2] (int64) give each
    part's rank rows and output columns: B is block-diagonal over the parts of a packed layer."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    widths: list[int]
    part_rows: torch.Tensor
    part_cols: torch.Tensor


def add_lora(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """y += (x · A[slot]ᵀ) · B[slot] per token, in place."""
    lora_a, lora_b, widths = layout.lora_a, layout.lora_b, layout.widths
    for seg in batch.segments:
        width = widths[seg.slot]
        if width:
            delta = _to(x[seg.start:seg.end], lora_a) @ lora_a[seg.slot, :width].T @ lora_b[seg.slot, :width]
            y[seg.start:seg.end] += _to(delta, y)
    group = batch.grouped
    if group is not None:
        width = max(widths[s] for s in group.slot_list)
        if width == 0:
            return
        kernel = lora_module() if y.device.type == "cpu" and x.dtype == lora_a.dtype == y.dtype else None
        if kernel is not None:
            kernel.lora_add_runs(y, x.contiguous(), lora_a, lora_b, group.runs, layout.part_rows, layout.part_cols)
            return
        if group.slot_range is not None:
            a, b = lora_a[:group.slot_range, :width], lora_b[:group.slot_range, :width]
        else:
            a, b = lora_a[group.slots, :width], lora_b[group.slots, :width]
        xs = _to(x[group.index], lora_a)  # [S, L, in]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b) * group.mask  # [S, L, out]
        y.index_add_(0, group.index.view(-1), _to(delta.view(-1, delta.shape[-1]), y))


def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)
