"""A request inside the engine: one prompt, its n sequences, the adapter they hold, and its timings."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from loraserve.engine.sequence import Sequence
from loraserve.lora.adapter import LoRAAdapter
from loraserve.lora.applied import AppliedLoRA
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


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

    def output(self) -> RequestOutput:
        """The cumulative RequestOutput of everything generated so far."""
        completions = [
            CompletionOutput(
                index=seq.index, text=seq.output_text, token_ids=seq.output_token_ids,  # a fresh slice
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                text_offsets=list(seq.text_offsets))
            for seq in self.seqs
        ]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, lora_request=self.lora_request, metrics=replace(self.metrics))
