"""Turns a scheduled step into a ForwardBatch, runs the model and samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.scheduler import ScheduledSeq
from loraserve.layers.forward_batch import AttentionMetadata, ForwardBatch, Lane, LoRABatch, PrefillSpan
from loraserve.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from loraserve.model.causal_lm import CausalLM


@dataclass
class StepResult:
    """What a step computed: the scheduled entries that sampled a token (in the sampler's row order) with the
    sampler's output, and the sampling entries of requests that got non-finite logits (not sampled: they fail)."""

    sampled: list[ScheduledSeq]
    output: SamplerOutput | None
    nonfinite: list[ScheduledSeq]


class ModelRunner:
    def __init__(self, model: CausalLM, block_size: int, eos_token_ids: list[int],
                 rope_factors: tuple[float, ...] = (1.0,)) -> None:
        self.model = model
        self.rope_index = {factor: index for index, factor in enumerate(rope_factors)}  # the model's RoPE tables
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.device = model.device
        self.sampler = Sampler()

    def run(self, scheduled: list[ScheduledSeq], lora_slots: dict[str, int]) -> StepResult:
        """Run one step. `lora_slots` maps adapter content hash -> slot for the adapters of this step.

        A request with a row of NaN or +inf logits (a broken adapter, an overflow) is not sampled, so it can
        fail alone while the other rows are sampled as usual. A raise changes no sequence: the KV this step
        wrote is written again when it is re-run, and the seeded rows' generators are put back."""
        batch, sampled = self.build_batch(scheduled, lora_slots)
        logits = self.model(batch)
        if not sampled:
            return StepResult([], None, [])
        nonfinite: list[ScheduledSeq] = []
        finite = _finite_rows(logits)
        if not bool(finite.all()):
            broken = {s.seq.request_id for s, ok in zip(sampled, finite.tolist(), strict=True) if not ok}
            keep = [s.seq.request_id not in broken for s in sampled]
            nonfinite = [s for s, kept in zip(sampled, keep, strict=True) if not kept]
            sampled = [s for s, kept in zip(sampled, keep, strict=True) if kept]
            if not sampled:
                return StepResult([], None, nonfinite)
            logits = logits[torch.tensor(keep, device=logits.device)]
        seqs = [s.seq for s in sampled]
        history = any(s.params.needs_penalties for s in seqs)  # else no step copies the sequences' tokens
        sampling = SamplingBatch.build(
            [s.params for s in seqs], [s.generator for s in seqs],
            [s.token_ids[:s.prompt_len] for s in seqs] if history else None,
            [s.output_token_ids for s in seqs] if history else None, self.eos_token_ids, self.device,
            [s.lora.eos_token_ids if s.lora is not None else frozenset() for s in seqs],
            [s.num_output_tokens for s in seqs])
        states = [(generator, generator.get_state()) for _, generator in sampling.seeded]
        try:
            return StepResult(sampled, self.sampler(logits, sampling), nonfinite)
        except BaseException:
            for generator, state in states:
                generator.set_state(state)
            raise

    def zero_kv(self, blocks: list[int]) -> None:
        """Zero these blocks' K and V in every layer, so non-finite KV a failed request left there cannot reach the
        block's next owner: the PyTorch decode path reads a last block whole, masking its unwritten end."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for module in self.model.modules():
            if hasattr(module, "k_cache"):
                module.k_cache[index] = 0
                module.v_cache[index] = 0

    def build_batch(self, scheduled: list[ScheduledSeq],
                    lora_slots: dict[str, int]) -> tuple[ForwardBatch, list[ScheduledSeq]]:
        """Prefill chunks first, then decodes; each group ordered by lane (the (slot, coefficient) pairs a
        sequence applies) so a lane's tokens form one contiguous run for the LoRA kernels."""
        lanes: dict[Lane, int] = {}

        def lane(s: ScheduledSeq) -> Lane:
            if s.seq.lora is None:
                return ()
            return tuple(sorted((lora_slots[adapter.content_hash], coef) for adapter, coef in s.seq.lora.coefficients))

        lane_by_seq = {id(s): lane(s) for s in scheduled}  # once per sequence: the sort and the spans read it

        def lane_of(s: ScheduledSeq) -> Lane:
            return lane_by_seq[id(s)]

        # A single token with context already cached is attended exactly like a decode.
        is_decode = [s.num_tokens == 1 and s.seq.num_computed_tokens > 0 for s in scheduled]
        prefills = sorted((s for s, d in zip(scheduled, is_decode, strict=True) if not d), key=lane_of)
        decodes = sorted((s for s, d in zip(scheduled, is_decode, strict=True) if d), key=lane_of)
        device = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        lane_spans: list[tuple[int, int]] = []
        token_factors: list[int] = []
        spans: list[PrefillSpan] = []
        logits_rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        bs = self.block_size
        for i, s in enumerate(prefills + decodes):
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            row = len(input_ids)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            for block in range(start // bs, (end - 1) // bs + 1):  # the KV slots, a block at a time
                offset = table[block] * bs - block * bs
                slot_mapping += range(offset + max(start, block * bs), offset + min(end, (block + 1) * bs))
            lane = lane_of(s)
            lane_spans.append((lanes.setdefault(lane, len(lanes)) if lane else -1, s.num_tokens))
            if seq.long_rope_from is not None:  # longrope: table 1 (long factors) once past the original context
                token_factors += [int(seq.long_rope_from == 0)] * s.num_tokens
            else:
                token_factors += [self.rope_index[seq.lora.rope_factor] if seq.lora else 0] * s.num_tokens
            if i < len(prefills):
                blocks = torch.tensor(table[:-(-end // bs)], dtype=torch.long, device=device)
                spans.append(PrefillSpan(row, row + s.num_tokens, end, blocks))
            if s.samples:
                logits_rows.append(len(input_ids) - 1)
                sampled.append(s)
        decode_tables = decode_lens = None
        if decodes:
            # padded with the sequence's own last block: the PyTorch decode path reads the padding and masks it,
            # but a masked NaN still spoils the sum (0 * NaN), so it must never be another sequence's KV
            width = max(len(s.seq.block_table) for s in decodes)
            decode_tables = torch.tensor([s.seq.block_table + s.seq.block_table[-1:] * (width - len(s.seq.block_table))
                                          for s in decodes], dtype=torch.long, device=device)
            decode_lens = torch.tensor([s.seq.num_computed_tokens + 1 for s in decodes], dtype=torch.long,
                                       device=device)
        attention = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            prefills=spans,
            decode_start=len(input_ids) - len(decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            block_size=bs,
        )
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            attention=attention,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
            lora=LoRABatch.from_spans(lane_spans, len(input_ids) - len(decodes), device, list(lanes)),
            rope_factors=torch.tensor(token_factors, device=device) if any(token_factors) else None,
        )
        return batch, sampled


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows without NaN or +inf, read off one sum per row (either makes the sum NaN or +inf); a
    fraction of the cost of isfinite().all(). -inf is fine: it fills the columns past a row's vocabulary.
    float16 sums in float32, so a row of large logits cannot overflow."""
    totals = logits.sum(dim=-1, dtype=torch.float32 if logits.dtype == torch.float16 else None)
    return totals.isfinite() | totals.isneginf()
