"""One sample being generated: its tokens, its KV blocks, its progress and its stopping state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from loraserve.lora.request import LoRARequest
from loraserve.outputs import Logprob
from loraserve.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """`token_ids` is prompt + output. `num_computed_tokens` counts tokens whose K/V sit in the cache;
    the sequence needs `len(token_ids) - num_computed_tokens` more tokens fed before it samples again."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_len: int
    token_ids: list[int]
    params: SamplingParams
    lora: LoRARequest | None = None
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    output_text: str = ""
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def lora_id(self) -> int:
        return self.lora.lora_int_id if self.lora else 0

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
