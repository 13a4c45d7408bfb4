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
    # adapter names of the requests running / waiting (a mix counts as each of its adapters), sorted, each once;
    # defaults, like block_size's and taken_at's, only for snapshots built by hand (tests, fakes)
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    block_size: int = 0  # tokens per KV-cache block
    taken_at: float = 0.0  # time.time() when the snapshot was taken
