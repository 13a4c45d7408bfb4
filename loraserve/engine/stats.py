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
    lora: LoRAStats | None  # None when LoRA is disabled
