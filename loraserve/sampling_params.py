"""Per-request sampling settings, validated once when the request is made."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

from loraserve.errors import ParamError


class RequestOutputKind(IntEnum):
    """What each output of a running request holds (vLLM's names): everything so far, only what is new since
    the previous output (a streaming server's choice: no copy of the whole history per token), or one output
    when the request finishes."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2

# Seeds are torch generator seeds: 64-bit signed integers, as vLLM accepts them.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MIN_TEMPERATURE = 1e-2  # a smaller positive temperature is raised to it (nearly greedy either way)
MIN_REPETITION_PENALTY = 1e-2  # and at most its inverse: beyond, a logit times the penalty overflows


@dataclass
class SamplingParams:
    """What to sample and when to stop; mirrors vLLM's SamplingParams.

    temperature 0 means greedy. Penalties follow vLLM/OpenAI: presence and frequency penalties
    subtract from the logits of tokens already generated; repetition_penalty (CTRL-style) divides
    positive and multiplies negative logits of tokens seen in the prompt or the output.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the sampled one)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ParamError("output_kind", f"{{param}} must be one of "
                                            f"{', '.join(k.name for k in RequestOutputKind)}, got {self.output_kind!r}"
                             ) from None
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ParamError(name, f"{{param}} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be a finite number")
        if self.n < 1:
            bad("n", "must be at least 1")
        if self.temperature < 0:
            bad("temperature", "must be non-negative (0 means greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:  # as vLLM: below this, logits / temperature overflow
            self.temperature = MIN_TEMPERATURE
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be -1 or 0 (disabled) or positive")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens={self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be between 0 and 20")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 1 / MIN_REPETITION_PENALTY:
            bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY}, {1 / MIN_REPETITION_PENALTY:g}] "
                                      f"(1 disables it)")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            bad("seed", "must be a 64-bit signed integer (between -2**63 and 2**63 - 1)")
        if any(not s for s in self.stop):
            raise ParamError("stop", "{param} strings must be non-empty")

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index` of the n: seed + index, wrapped into the 64-bit range."""
        if self.seed is None:
            return None
        return (self.seed + index - SEED_MIN) % 2**64 + SEED_MIN

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
