"""One step's worth of work for the model, built by the model runner and passed explicitly to forward:
flat tokens, where their K/V go and come from, and which adapter slot each token uses."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class PrefillSpan:
    """Tokens [start, end) of the flat batch are the last end-start of a sequence's context_len tokens."""

    start: int
    end: int
    context_len: int
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] int64

    @property
    def fresh(self) -> bool:
        """True when the chunk is the whole context: attend to its own K/V, no cache read."""
        return self.end - self.start == self.context_len


@dataclass
class AttentionMetadata:
    """The flat batch holds prefill chunks first (each a run of one sequence's tokens), then one token per
    decoding sequence, which are attended together."""

    slot_mapping: torch.Tensor  # [T] int64, the flat KV-cache slot (block * block_size + offset) per token
    prefills: list[PrefillSpan]
    decode_start: int  # tokens [decode_start, T) are decoding, one per sequence
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with block 0)
    decode_context_lens: torch.Tensor | None  # [B] int64, tokens each decoding sequence attends to
    block_size: int

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        """[B, 1, 1, max_blocks * block_size] bool, True = attend (for the PyTorch decode path)."""
        width = self.decode_block_tables.shape[1] * self.block_size
        positions = torch.arange(width, device=self.decode_context_lens.device)
        return (positions[None, :] < self.decode_context_lens[:, None])[:, None, None, :]

    def decode_window_mask(self, window: int) -> torch.Tensor:
        """decode_mask's shape, True for the last `window` positions of each sequence (the token itself included)."""
        width = self.decode_block_tables.shape[1] * self.block_size
        positions = torch.arange(width, device=self.decode_context_lens.device)
        return (positions[None, :] >= self.decode_context_lens[:, None] - window)[:, None, None, :]


@dataclass(frozen=True)
class LoRASegment:
    """Tokens [start, end) add slot `slot`'s LoRA term times `coef` (the request's lora_scale, times its weight
    in a mix)."""

    slot: int
    start: int
    end: int
    coef: float = 1.0


# What a token applies: (slot, coefficient) of each adapter, one pair for a single adapter, several for a mix.
Lane = tuple[tuple[int, float], ...]


@dataclass
class GroupedTokens:
    """Short runs gathered per slot: row s of `index` lists the tokens of slot `slots[s]`, right-padded
    with that run's first token; `weights` [S, L, 1] holds each token's coefficient, 0 for the padding."""

    slot_list: list[int]
    slots: torch.Tensor  # [S] int64, the same on the device
    index: torch.Tensor  # [S, L] int64 rows of the flat batch
    weights: torch.Tensor  # [S, L, 1] float32
    slot_range: int | None  # k when slots == 0..k-1, so weights can be sliced instead of gathered


@dataclass
class LoRABatch:
    """Which adapters each token applies, as runs: the model runner orders sequences by lane (the
    (slot, coefficient) pairs they apply), so each lane's tokens are contiguous. A lane of several adapters
    (a mix) gives several runs over the same tokens, next to each other. Each path builds its own view of the
    runs on first use (the CPU kernel `kernel_runs` and `long_segments`, other devices `segments` and
    `grouped`), so a step pays only for the path it takes."""

    segments: list[LoRASegment]  # prefill chunks
    decode_runs: list[LoRASegment]  # runs of decode tokens
    device: torch.device
    token_lanes: list[int]  # each token's index into `lanes` (-1: no adapter)
    lanes: list[Lane]

    # Past this a run is a real matmul that BLAS does faster than the kernel's register tiles.
    KERNEL_MAX_RUN = 256

    @classmethod
    def build(cls, token_lanes: list[int], grouped_from: int, device: torch.device,
              lanes: list[Lane] | None = None) -> LoRABatch | None:
        """Runs of equal lane in token order (-1, no adapter, makes none); without `lanes` each lane index is a
        slot at coefficient 1. Runs starting at or after token `grouped_from` are decode runs; earlier runs are
        prefill segments. None if no token has an adapter."""
        spans = [(lane, len(list(group))) for lane, group in itertools.groupby(token_lanes)]
        return cls.from_spans(spans, grouped_from, device, lanes)

    @classmethod
    def from_spans(cls, spans: list[tuple[int, int]], grouped_from: int, device: torch.device,
                   lanes: list[Lane] | None = None) -> LoRABatch | None:
        """`build` from (lane, tokens) spans in token order (one per sequence, as the model runner has them):
        the work follows the sequences, not their tokens."""
        if lanes is None:
            lanes = [((slot, 1.0),) for slot in range(max((lane for lane, _ in spans), default=-1) + 1)]
        segments: list[LoRASegment] = []
        decode_runs: list[LoRASegment] = []
        token_lanes: list[int] = []
        start = 0
        for lane, count in _merged(spans):
            end = start + count
            if lane >= 0:
                for lo, hi in ((start, min(end, grouped_from)), (max(start, grouped_from), end)):
                    if hi > lo:
                        runs = decode_runs if lo >= grouped_from else segments
                        runs += [LoRASegment(slot, lo, hi, coef) for slot, coef in lanes[lane]]
            token_lanes += [lane] * count
            start = end
        if not segments and not decode_runs:
            return None
        return cls(segments, decode_runs, device, token_lanes, lanes)

    @property
    def num_tokens(self) -> int:
        return len(self.token_lanes)

    @cached_property
    def slots_present(self) -> list[int]:
        return sorted({run.slot for run in self.segments + self.decode_runs})

    @property
    def num_slots(self) -> int:
        """One past the highest slot used: slots index [0, num_slots)."""
        return self.slots_present[-1] + 1

    @cached_property
    def lane_ids(self) -> torch.Tensor:
        """[num_tokens] int64, each token's lane (-1: no adapter), for layers that regroup tokens (experts)."""
        return torch.tensor(self.token_lanes, dtype=torch.long, device=self.device)

    @cached_property
    def unit_slots(self) -> torch.Tensor:
        """[num_tokens] int64: the slot of each token applying one adapter at coefficient 1, else -1; per-slot
        tables are gathered with it (row -1 is the identity), the other tokens' runs are `weighted_runs`."""
        unit = [lane[0][0] if len(lane) == 1 and lane[0][1] == 1.0 else -1 for lane in self.lanes]
        return torch.tensor([unit[lane] if lane >= 0 else -1 for lane in self.token_lanes], dtype=torch.long,
                            device=self.device)

    @cached_property
    def weighted_runs(self) -> list[LoRASegment]:
        """The runs of tokens that apply an adapter at a coefficient other than 1, or several adapters."""
        lanes = self.lanes
        return [run for run in self.segments + self.decode_runs
                if lanes[self.token_lanes[run.start]] != ((run.slot, 1.0),)]

    def select(self, rows: torch.Tensor) -> LoRABatch | None:
        """The runs of a subset of the batch's tokens (`rows`, in order: the rows whose logits are computed),
        one token per sequence, so all of them count as decode runs."""
        lanes = self.token_lanes
        return LoRABatch.build([lanes[row] for row in rows.tolist()], 0, self.device, self.lanes)

    @cached_property
    def kernel_runs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([N, 3] int64 (slot, begin, end), [N] float32 coefficients): every run of at most KERNEL_MAX_RUN
        tokens, prefill chunks included."""
        runs = [r for r in self.segments + self.decode_runs if r.end - r.start <= self.KERNEL_MAX_RUN]
        if not runs:
            return None
        return (torch.tensor([(r.slot, r.start, r.end) for r in runs], dtype=torch.long, device=self.device),
                torch.tensor([r.coef for r in runs], dtype=torch.float32, device=self.device))

    @cached_property
    def long_segments(self) -> list[LoRASegment]:
        """The runs the kernel leaves to matmuls."""
        return [seg for seg in self.segments + self.decode_runs if seg.end - seg.start > self.KERNEL_MAX_RUN]

    @cached_property
    def grouped(self) -> GroupedTokens | None:
        """The decode runs gathered per slot, for the batched-matmul path."""
        if not self.decode_runs:
            return None
        tokens: dict[int, list[tuple[int, float]]] = {}
        for run in self.decode_runs:
            tokens.setdefault(run.slot, []).extend((row, run.coef) for row in range(run.start, run.end))
        return _group(tokens, self.device)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent spans of one lane joined."""
    merged: list[tuple[int, int]] = []
    for lane, count in spans:
        if merged and merged[-1][0] == lane:
            merged[-1] = (lane, merged[-1][1] + count)
        elif count:
            merged.append((lane, count))
    return merged


def _group(tokens: dict[int, list[tuple[int, float]]], device: torch.device) -> GroupedTokens:
    slots = sorted(tokens)
    width = max(len(rows) for rows in tokens.values())
    index = [[row for row, _ in tokens[s]] + [tokens[s][0][0]] * (width - len(tokens[s])) for s in slots]
    weights = [[coef for _, coef in tokens[s]] + [0.0] * (width - len(tokens[s])) for s in slots]
    contiguous = slots == list(range(len(slots)))
    return GroupedTokens(
        slot_list=slots,
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        index=torch.tensor(index, dtype=torch.long, device=device),
        weights=torch.tensor(weights, dtype=torch.float32, device=device).unsqueeze(-1),
        slot_range=len(slots) if contiguous else None,
    )


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] flat tokens of all scheduled sequences
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the flat batch whose next token is sampled
    lora: LoRABatch | None = None  # per-token adapter slots; None when no token uses an adapter
    # [T] int64 index into the model's RoPE factors per token (long-context adapters); None: all the model's own
    rope_factors: torch.Tensor | None = None

    @cached_property
    def logits_lora(self) -> LoRABatch | None:
        """The adapter runs of the logits rows (the final norm and the LM head see only those)."""
        return None if self.lora is None else self.lora.select(self.logits_indices)
