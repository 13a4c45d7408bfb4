"""What a request gives back: one RequestOutput with one CompletionOutput per sample (n), in vLLM's shape."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraserve.lora_request import LoRARequest


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins a stop string: it may yet become the stop, which
    the final text leaves out, so a stream must not send it early."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class Logprob:
    """Log-probability of one token, with its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it; for "error", why it failed
    # Per token: where in `text` the characters it contributes begin (a token that only starts a multi-byte
    # character points at that character). At most len(text): a stop string may have cut the text short.
    text_offsets: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life, as vLLM reports them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """A request's state: everything generated so far, or with SamplingParams.output_kind=DELTA only what each
    sample added since the previous output (its text_offsets still count from the start of the sample's text;
    samples with nothing new are left out)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    lora_request: LoRARequest | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request (RequestFailedError's message)

    @property
    def lora_name(self) -> str | None:
        return self.lora_request.lora_name if self.lora_request else None


def add_delta(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """The whole output of a request so far, `total` (None at first), with a DELTA output added: what a caller
    that streams deltas but also wants the final answer keeps (in place; samples ordered by index)."""
    if total is None:
        total = replace(delta, outputs=[])
    by_index = {c.index: c for c in total.outputs}
    for c in delta.outputs:
        kept = by_index.get(c.index)
        if kept is None:
            by_index[c.index] = replace(c, token_ids=list(c.token_ids), text_offsets=list(c.text_offsets),
                                        logprobs=None if c.logprobs is None else list(c.logprobs))
            continue
        kept.text += c.text
        kept.token_ids.extend(c.token_ids)
        kept.text_offsets.extend(c.text_offsets)
        if c.logprobs is not None and kept.logprobs is not None:
            kept.logprobs.extend(c.logprobs)
        kept.cumulative_logprob, kept.finish_reason, kept.stop_reason = (c.cumulative_logprob, c.finish_reason,
                                                                         c.stop_reason)
    total.outputs = sorted(by_index.values(), key=lambda c: c.index)
    total.finished, total.metrics = delta.finished, delta.metrics
    return total
