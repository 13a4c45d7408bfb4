"""A request inside the engine: one prompt, its n sequences, the adapter they hold, and its timings."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

from loraserve.engine.sequence import Sequence
from loraserve.lora.adapter import LoRAAdapter
from loraserve.lora.applied import AppliedLoRA
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, held_back
from loraserve.sampling_params import RequestOutputKind


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    lora_request: LoRARequest | LoRAMix | None
    lora: AppliedLoRA | None  # what its sequences apply
    metrics: RequestMetrics
    held: list[LoRAAdapter] = field(default_factory=list)  # pinned in the host cache until the request ends

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)

    @property
    def final_only(self) -> bool:
        return self.seqs[0].params.output_kind is RequestOutputKind.FINAL_ONLY

    def output(self) -> RequestOutput:
        """The RequestOutput of everything generated so far, or (output_kind DELTA) of what is new."""
        if self.seqs[0].params.output_kind is RequestOutputKind.DELTA:
            completions = [c for c in map(_delta, self.seqs) if c is not None]
        else:
            completions = [_completion(seq, 0, len(seq.output_text), 0, seq.num_output_tokens) for seq in self.seqs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, lora_request=self.lora_request, metrics=replace(self.metrics))


def _completion(seq: Sequence, start: int, end: int, first: int, last: int) -> CompletionOutput:
    """Sample `seq`'s output text [start, end) and tokens [first, last), in fresh lists."""
    wants_logprobs = seq.params.logprobs is not None
    text = seq.output_text
    return CompletionOutput(
        index=seq.index, text=text[start:end] if start or end < len(text) else text,
        token_ids=seq.token_ids[seq.prompt_len + first:seq.prompt_len + last],
        cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
        logprobs=seq.logprobs[first:last] if wants_logprobs else None,
        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, text_offsets=seq.text_offsets[first:last])


def _delta(seq: Sequence) -> CompletionOutput | None:
    """What `seq` added since its last delta, or None when nothing. Text that may yet become a stop string is
    held back until it is decided, and so are the tokens whose text begins in it (a stop string would move
    their offsets), so no delta ever carries anything the final answer leaves out or changes."""
    if seq.sent_final:
        return None
    text = seq.output_text
    if seq.finished:
        end, tokens = len(text), seq.num_output_tokens
    else:
        end = max(seq.sent_text, len(text) - held_back(text, seq.params.stop))
        tokens = bisect.bisect_right(seq.text_offsets, end, lo=seq.sent_tokens)  # offsets never decrease
    if end == seq.sent_text and tokens == seq.sent_tokens and not seq.finished:
        return None
    completion = _completion(seq, seq.sent_text, end, seq.sent_tokens, tokens)
    seq.sent_text, seq.sent_tokens, seq.sent_final = end, tokens, seq.finished
    return completion
