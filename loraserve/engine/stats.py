"""A snapshot of the engine's state for metrics, taken on the step thread between two steps."""
from __future__ import annotations

from dataclasses import dataclass

from loraserve.lora.manager import LoRAStats


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests with a sequence in the running batch
    waiting: int  # requests with a sequence waiting for admission
    num_blocks: int
    free_blocks: int
    preemptions: int
    prefix_queried_tokens: int  # prompt tokens of admitted sequences looked up in the prefix cache
    prefix_hit_tokens: int  # of those, found there (not recomputed)
    weight_bytes: int  # model weights held (quantized ones at their quantized size)
    model_resident_bytes: int  # what building the model added to the process's resident memory
    resident_bytes: int  # the process's resident memory now
    lora: LoRAStats | None  # None when LoRA is disabled
