"""One sample being generated: its tokens, its KV blocks, its progress and its output so far."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.lora.applied import AppliedLoRA
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
    detokenizer: IncrementalDetokenizer | None = None  # None only for sequences that are never sampled
    lora: AppliedLoRA | None = None  # its adapters, held in host memory for as long as the request lives
    generator: torch.Generator | None = None
    # longrope: the original context length while the sequence fits it (short factors), 0 once it is longer
    # (long factors for all of it: the scheduler then recomputes its KV, as transformers does); None: one table
    long_rope_from: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full computed blocks
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    text_offsets: list[int] = field(default_factory=list)  # per output token, see CompletionOutput
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # delta outputs: how much of the output earlier outputs carried, and whether they carried its end
    sent_tokens: int = 0
    sent_text: int = 0
    sent_final: bool = False

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
    def lora_key(self) -> str | None:
        """The adapter identity (content hashes with scales and weights): sequences with equal keys compute
        the same thing, so they may share KV prefixes."""
        return self.lora.key if self.lora is not None else None

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
