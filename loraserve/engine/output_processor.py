"""What a sampled token does to its sequence: append it, detokenise it, record its logprobs and where its
text begins, and decide whether the sequence stops (stop token, EOS, stop string, length).

Stop strings are searched only where a match could end in the text this token added, so each step costs
the length of the new text plus the stop strings, not of the whole output, and a stop string that appeared
while min_tokens held stops back is never matched later: the first min_tokens tokens are never ended on,
as in vLLM.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.sequence import Sequence
from loraserve.layers.sampler import SamplerOutput
from loraserve.outputs import Logprob
from loraserve.sampling_params import SamplingParams


def find_stop_string(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest (position, stop) among stop strings that end within the last `new_chars` characters."""
    best: tuple[int, str] | None = None
    for stop in stops:
        position = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if position != -1 and (best is None or position < best[0]):
            best = (position, stop)
    return best


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def detokenizer(self, prompt_token_ids: list[int], params: SamplingParams,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> IncrementalDetokenizer:
        """A sequence's detokenizer, with its adapter's tokenizer where it has one (default: the model's)."""
        return IncrementalDetokenizer(tokenizer or self.tokenizer, prompt_token_ids, params.skip_special_tokens)

    def append(self, seqs: list[Sequence], result: SamplerOutput) -> None:
        """Add row i of the sampler's output to seqs[i]; a sequence that stops gets its finish_reason."""
        token_ids = result.token_ids.tolist()
        entries = self._logprob_entries(result, [seq.params.logprobs for seq in seqs],
                                        [seq.detokenizer.tokenizer for seq in seqs])
        for row, seq in enumerate(seqs):
            self._append(seq, token_ids[row], entries[row] if entries is not None else None)

    def _append(self, seq: Sequence, token: int, entry: dict[int, Logprob] | None) -> None:
        params = seq.params
        seq.token_ids.append(token)
        if entry is not None and params.logprobs is not None:
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[token].logprob
        seq.text_offsets.append(len(seq.output_text) + seq.detokenizer.held)
        new_text = seq.detokenizer.add(token)
        may_stop = seq.num_output_tokens > params.min_tokens
        finish: tuple[str, int | str | None] | None = None
        if may_stop and token in params.stop_token_ids:
            finish = ("stop", token)
        elif may_stop and not params.ignore_eos and (token in self.eos_token_ids or (
                seq.lora is not None and token in seq.lora.eos_token_ids)):
            finish = ("stop", None)
        elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or len(seq.token_ids) >= self.max_model_len:
            finish = ("length", None)
        if finish is not None:
            new_text += seq.detokenizer.flush()
        seq.output_text += new_text
        if may_stop and params.stop and new_text:
            hit = find_stop_string(seq.output_text, len(new_text), params.stop)
            if hit is not None:
                position, stop = hit
                end = position + len(stop) if params.include_stop_str_in_output else position
                seq.output_text = seq.output_text[:end]
                seq.text_offsets = [min(offset, end) for offset in seq.text_offsets]
                finish = ("stop", stop)
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish

    def _logprob_entries(self, result: SamplerOutput, wanted: list[int | None],
                         tokenizers: list[PreTrainedTokenizerBase]) -> list[dict[int, Logprob]] | None:
        """Per row: the top-k (k = that row's logprobs) and the sampled token, each decoded on its own."""
        if result.logprobs is None:
            return None
        sampled_ids, sampled_lp, ranks = result.token_ids.tolist(), result.logprobs.tolist(), result.ranks.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        entries = []
        for row, k in enumerate(wanted):
            entry: dict[int, Logprob] = {}
            for rank in range(k or 0):
                entry[top_ids[row][rank]] = Logprob(top_lp[row][rank], rank + 1)
            entry[sampled_ids[row]] = Logprob(sampled_lp[row], ranks[row])
            for token_id, lp in entry.items():
                lp.decoded_token = tokenizers[row].decode([token_id])
            entries.append(entry)
        return entries
