"""Batched LoRA on a flat token batch: shrink (x·Aᵀ) then expand (·B), one pair of matmuls per run of
tokens that share an adapter. The model runner orders sequences by adapter slot, so a step holds at most
two runs per adapter (prefill and decode) whatever the number of requests, and tokens without an adapter
cost nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRASegment:
    slot: int
    start: int
    end: int


@dataclass
class LoRABatch:
    segments: list[LoRASegment]

    @classmethod
    def from_token_slots(cls, token_slots: list[int]) -> LoRABatch | None:
        """Runs of equal slot in token order; slot -1 (no adapter) makes no segment. None if no adapter."""
        segments = []
        start = 0
        for i in range(1, len(token_slots) + 1):
            if i == len(token_slots) or token_slots[i] != token_slots[start]:
                if token_slots[start] >= 0:
                    segments.append(LoRASegment(token_slots[start], start, i))
                start = i
        return cls(segments) if segments else None


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             widths: list[int], batch: LoRABatch) -> None:
    """y[seg] += (x[seg] · A[slot]ᵀ) · B[slot] for each segment, in place.

    lora_a: [slots, W, in], lora_b: [slots, W, out]; only the first widths[slot] rows of a slot are used, so
    the cost follows the adapter's own rank rather than max_lora_rank.
    """
    for seg in batch.segments:
        width = widths[seg.slot]
        if width == 0:
            continue
        xs = x[seg.start:seg.end]
        if xs.dtype != lora_a.dtype:
            xs = xs.to(lora_a.dtype)
        h = xs @ lora_a[seg.slot, :width].T
        delta = h @ lora_b[seg.slot, :width]
        y[seg.start:seg.end] += delta if delta.dtype == y.dtype else delta.to(y.dtype)
