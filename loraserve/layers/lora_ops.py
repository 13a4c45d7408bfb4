"""The LoRA hot path: the one slot layout every adapted tensor uses (a linear layer, a fused expert stack, the
embedding table, the LM head), and the batched shrink (x·Aᵀ) then expand (·B) over a flat token batch.

Slot s holds one adapter's A and B for every part of the tensor (q/k/v of a packed qkv, gate/up...). The
targeted parts' A matrices are stacked row-wise so one shrink serves all of them; B is block-diagonal over
the parts so one expand writes every part's output columns. A slot uses only its first widths rows, so the
work follows the adapter's own rank rather than max_lora_rank. A fused expert stack has `experts` such
blocks per slot: row v = slot·experts + expert of lora_a / lora_b is a "virtual slot", which is what the
kernel indexes, so dense and expert LoRA are one layout and one kernel call.

Each run carries a coefficient c (the request's lora_scale, times its weight in a mix) multiplying its rank
term, so one slot serves every scale of its adapter. Beside the rank term a slot may carry a per-output-column
affine map applied after it, y ← y·scale + shift, for that slot's tokens only: DoRA's magnitude over the
adapted weight's row norm (with the shift that keeps the base bias out of the scaling), and the bias deltas of
adapters that train biases (`lora_bias`, bias="all" / "lora_only"). The tables hold the map at c = 1: row
`slots` is the identity, so a token without an adapter (slot -1) indexes it and is left alone; they are
allocated when the first adapter needing them arrives. Tokens at another c get the map `OutputTerms` gives
for it, per run (DoRA's norm ‖W₀ + c·BA‖ and the lora_B bias depend on c; a trained base bias does not).

The model runner orders sequences by slot, so each adapter's tokens form contiguous runs. On CPU one C++
call per tensor does every run of up to LoRABatch.KERNEL_MAX_RUN tokens, prefill chunks and decode tokens of
all adapters alike (csrc/lora_segments.cpp: tiny matmuls pay a fixed cost that dwarfs their arithmetic, and
the kernel reads each adapter's weights once per step); longer runs get a pair of matmuls each. Elsewhere
prefill chunks get a pair of matmuls each and the decode tokens are gathered into a [slots, longest run]
block done with two batched matmuls for all adapters at once. Either way the number of calls does not grow
with the number of adapters. Tokens without an adapter cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraserve.layers.cpu_kernels import cpu_kernel, lora_module
from loraserve.layers.forward_batch import LoRABatch, LoRASegment


@dataclass
class DoRANorms:
    """DoRA's row norms of W₀ + c·BA (B scaled) at any coefficient c: ‖·‖² = weight_sq + 2c·cross + c²·lora_sq
    per output row, float32; `at_one` is the norm at c = 1, formed as PEFT forms it where W₀ is at hand."""

    at_one: torch.Tensor
    weight_sq: torch.Tensor
    cross: torch.Tensor
    lora_sq: torch.Tensor

    @classmethod
    def expanded(cls, weight_sq: torch.Tensor, cross: torch.Tensor, lora_sq: torch.Tensor) -> DoRANorms:
        """From the three terms alone (no dense W₀ to form the norm at 1 directly)."""
        return cls(_norm(weight_sq, cross, lora_sq, 1.0), weight_sq, cross, lora_sq)

    def at(self, coef: float) -> torch.Tensor:
        return self.at_one if coef == 1.0 else _norm(self.weight_sq, self.cross, self.lora_sq, coef)


def _norm(weight_sq: torch.Tensor, cross: torch.Tensor, lora_sq: torch.Tensor, coef: float) -> torch.Tensor:
    return (weight_sq + 2 * coef * cross + coef * coef * lora_sq).clamp(min=0).sqrt()


@dataclass
class SlotPart:
    """What one adapter puts into one part of a tensor. lora_a [r, in] and lora_b [out_part, r] (with an
    expert stack: [experts, r, in] / [experts, out_part, r]), scaling folded into B, or both None when the
    adapter only changes the part's outputs. The output map's pieces, each [out_part] float32: DoRA's
    `magnitude` with its `norms` and the `base_bias` its scaling leaves out; `lora_shift`, scaled with the
    coefficient (lora_B's bias); `fixed_shift`, not scaled (a trained base bias minus the base's)."""

    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    norms: DoRANorms | None = None
    base_bias: torch.Tensor | None = None
    lora_shift: torch.Tensor | None = None
    fixed_shift: torch.Tensor | None = None

    def output_map(self, coef: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) of y ← y·scale + shift at coefficient `coef`, each None when it is the identity."""
        scale = None if self.magnitude is None else self.magnitude / self.norms.at(coef)
        shifts = [coef * self.lora_shift if self.lora_shift is not None else None, self.fixed_shift]
        if scale is not None and self.base_bias is not None:  # y·g + (1-g)·b = g·(y - b) + b
            shifts.append((1 - scale) * self.base_bias.float())
        shifts = [t for t in shifts if t is not None]
        return scale, (sum(shifts[1:], shifts[0]) if shifts else None)

    @property
    def weighted(self) -> bool:
        """Whether the output map depends on the coefficient."""
        return self.magnitude is not None or self.lora_shift is not None


@dataclass
class SlotLayout:
    """lora_a: [slots·experts, W, in], lora_b: [slots·experts, W, out] with W = parts * max_rank; part_rows
    [slots·experts, parts, 2] and part_cols [parts, 2] (int64) give each part's rank rows and output columns;
    widths [slots·experts] the rows in use; `part_names` are the parts in stacking order (what `fill` is
    given weights by). out_scale / out_shift: [slots + 1, out] or None, the output maps at coefficient 1;
    `weighted`: slot -> its parts (column start, SlotPart) whose map depends on the coefficient."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    widths: list[int]
    part_rows: torch.Tensor
    part_cols: torch.Tensor
    part_names: tuple[str, ...] = ()
    experts: int = 1
    out_scale: torch.Tensor | None = None
    out_shift: torch.Tensor | None = None
    scaled: set[int] = field(default_factory=set)  # slots whose out_scale row is in use
    shifted: set[int] = field(default_factory=set)
    weighted: dict[int, list[tuple[int, SlotPart]]] = field(default_factory=dict)

    @classmethod
    def allocate(cls, parts: dict[str, int], in_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, experts: int = 1, lazy: bool = False) -> SlotLayout:
        """Empty slots for a tensor whose `parts` (name -> output features) are stacked in that order. `lazy`:
        the factor tables are allocated by the first fill that needs them (the embedding table and the LM head,
        whose vocabulary-wide factors most adapters never use)."""
        out_features = sum(parts.values())
        bounds, start = [], 0
        for size in parts.values():
            bounds.append([start, start + size])
            start += size
        rows = num_slots * experts
        factors = (rows, len(parts) * max_rank)
        layout = cls(
            lora_a=torch.zeros(0, *factors[1:], in_features, dtype=dtype, device=device),
            lora_b=torch.zeros(0, *factors[1:], out_features, dtype=dtype, device=device),
            widths=[0] * rows,
            part_rows=torch.zeros(rows, len(parts), 2, dtype=torch.long, device=device),
            part_cols=torch.tensor(bounds, dtype=torch.long, device=device),
            part_names=tuple(parts),
            experts=experts,
        )
        if not lazy:
            layout._materialize()
        return layout

    def _materialize(self) -> None:
        rows = self.part_rows.shape[0]
        if self.lora_a.shape[0] != rows:
            self.lora_a = self.lora_a.new_zeros(rows, *self.lora_a.shape[1:])
            self.lora_b = self.lora_b.new_zeros(rows, *self.lora_b.shape[1:])

    @property
    def in_use(self) -> bool:
        """Whether any slot holds anything here (a lazy layout never filled holds nothing)."""
        return any(self.widths) or bool(self.scaled or self.shifted)

    @property
    def num_slots(self) -> int:
        return self.part_rows.shape[0] // self.experts

    @property
    def nbytes(self) -> int:
        """Bytes the slots take, rank factors and output maps."""
        tables = [self.lora_a, self.lora_b, self.out_scale, self.out_shift]
        return sum(t.nbytes for t in tables if t is not None)

    def fill(self, slot: int, parts: dict[str, SlotPart]) -> None:
        """Write an adapter into `slot`, part name -> SlotPart. Parts left out get no rows, so they cost
        nothing. Runs inside a step, so it touches only what the old and the new adapter occupy."""
        self.clear(slot)
        virtual = slice(slot * self.experts, (slot + 1) * self.experts)
        offset, rows = 0, [[0, 0] for _ in self.part_names]
        for index, name in enumerate(self.part_names):
            part = parts.get(name)
            if part is None:
                continue
            # an adapter's vocabulary may be narrower than a table's slots, sized for added tokens: it fills the
            # leading columns (of B, and of A for an embedding)
            col_start = self.part_cols[index, 0].item()
            for values, table, identity in zip(part.output_map(1.0), ("out_scale", "out_shift"), (1.0, 0.0),
                                               strict=True):
                if values is not None:
                    self._output_table(table, identity)[slot, col_start:col_start + values.shape[0]].copy_(values)
                    (self.scaled if table == "out_scale" else self.shifted).add(slot)
            if part.weighted:
                self.weighted.setdefault(slot, []).append((col_start, part))
            if part.lora_a is None:
                continue
            self._materialize()
            rank, fan_in, fan_out = part.lora_a.shape[-2], part.lora_a.shape[-1], part.lora_b.shape[-2]
            self.lora_a[virtual, offset:offset + rank, :fan_in].copy_(part.lora_a)
            cols = slice(col_start, col_start + fan_out)
            self.lora_b[virtual, offset:offset + rank, cols].copy_(part.lora_b.transpose(-1, -2))
            rows[index] = [offset, offset + rank]
            offset += rank
        self.part_rows[virtual] = torch.tensor(rows, dtype=torch.long)
        self.widths[virtual] = [offset] * self.experts

    def clear(self, slot: int) -> None:
        """Zero the slot's rows. In B only each part's own block is non-zero (the rest of its rows stays
        zero from allocation on), so only those blocks are zeroed."""
        self.weighted.pop(slot, None)
        if slot in self.scaled:
            self.out_scale[slot].fill_(1.0)
            self.scaled.discard(slot)
        if slot in self.shifted:
            self.out_shift[slot].zero_()
            self.shifted.discard(slot)
        virtual = slice(slot * self.experts, (slot + 1) * self.experts)
        width = self.widths[slot * self.experts]
        if width == 0:
            return
        self.lora_a[virtual, :width].zero_()  # all of A's columns: an embedding's may be narrower than the slot
        for (row_start, row_end), (col_start, col_end) in zip(self.part_rows[slot * self.experts].tolist(),
                                                               self.part_cols.tolist(), strict=True):
            if row_end > row_start:
                self.lora_b[virtual, row_start:row_end, col_start:col_end].zero_()
        self.part_rows[virtual].zero_()
        self.widths[virtual] = [0] * self.experts

    def output_map(self, slot: int, coef: float, columns: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) [columns] of the slot's output map at coefficient `coef`, None where identity."""
        scale = self.out_scale[slot, :columns] if slot in self.scaled else None
        shift = self.out_shift[slot, :columns] if slot in self.shifted else None
        parts = self.weighted.get(slot)
        if coef == 1.0 or not parts:
            return scale, shift
        scale = None if scale is None else scale.float().clone()
        shift = None if shift is None else shift.float().clone()
        for col_start, part in parts:
            if col_start >= columns:
                continue
            part_scale, part_shift = part.output_map(coef)
            for values, table in ((part_scale, scale), (part_shift, shift)):
                if values is not None:
                    width = min(values.shape[0], columns - col_start)
                    table[col_start:col_start + width] = values[:width]
        return scale, shift

    def _output_table(self, name: str, identity: float) -> torch.Tensor:
        table = getattr(self, name)
        if table is None:
            table = torch.full((self.num_slots + 1, self.lora_b.shape[-1]), identity, dtype=self.lora_b.dtype,
                               device=self.lora_b.device)
            setattr(self, name, table)
        return table


def _kernel(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout):
    """The C++ runs kernel when the tensors allow it (any float dtype on CPU), else None: the one place
    that decides between it and the PyTorch path, for every kind of slot."""
    return cpu_kernel(lora_module, y, x, layout.lora_a, any_dtype=True)


def add_lora(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """y += c · (x · A[slot]ᵀ) · B[slot] per run, then each slot's output map, in place."""
    kernel = _kernel(y, x, layout)
    if kernel is not None:
        if batch.kernel_runs is not None:
            kernel.lora_add_runs(y, x.contiguous(), layout.lora_a, layout.lora_b, *batch.kernel_runs,
                                 layout.part_rows, layout.part_cols)
        _add_segments(y, x, layout, batch.long_segments)
    else:
        _add_segments(y, x, layout, batch.segments)
        _add_grouped(y, x, layout, batch)
    apply_output_maps(y, layout, batch)


def add_lora_groups(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, groups: list[LoRASegment]) -> None:
    """For an expert stack: y += c · x · A[v]ᵀ · B[v] over the rows of each group, whose `slot` is the virtual
    slot v = slot·experts + expert and whose rows the caller sorted by expert (a mix's groups over the same
    rows adjacent)."""
    runs = [run for run in groups if layout.widths[run.slot]]
    if not runs:
        return
    kernel = _kernel(y, x, layout)
    if kernel is None:
        _add_segments(y, x, layout, runs)
        return
    table = torch.tensor([(r.slot, r.start, r.end) for r in runs], dtype=torch.long, device=y.device)
    coefs = torch.tensor([r.coef for r in runs], dtype=torch.float32, device=y.device)
    kernel.lora_add_runs(y, x.contiguous(), layout.lora_a, layout.lora_b, table, coefs, layout.part_rows,
                         layout.part_cols)


def add_lora_per_run(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """add_lora with a pair of matmuls per run, for a tensor run once per step whose outputs are wide (the
    LM head over a vocabulary): no gathered copies of its B or of the outputs; y may be wider in dtype than
    the factors (float32 logits) and narrower than the slots (a vocabulary without the added tokens' columns
    when no adapter of the batch adds any)."""
    _add_segments(y, x, layout, batch.segments + batch.decode_runs)
    apply_output_maps(y, layout, batch)


def add_embedding_lora(y: torch.Tensor, token_ids: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """An embedding table's LoRA (PEFT's lora_embedding_A [r, vocab] / lora_embedding_B): the shrink of a
    token is column `id` of A, so y += c · A[slot][:, ids]ᵀ · B[slot] per run, then the output maps. Once per
    step, so a matmul per run is cheap."""
    for run in batch.segments + batch.decode_runs:
        width = layout.widths[run.slot]
        if width:
            a, b = layout.lora_a[run.slot, :width], layout.lora_b[run.slot, :width]
            y[run.start:run.end] += _to(_weighted(a[:, token_ids[run.start:run.end]].T, run.coef) @ b, y)
    apply_output_maps(y, layout, batch)


def apply_output_maps(y: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """y ← y·scale + shift per token, where a slot of the batch has an output map: gathered per token for
    tokens at coefficient 1, per run for the others (their map depends on the coefficient)."""
    if not (layout.scaled or layout.shifted):  # most layers of most batches: nothing to map, no set built
        return
    mapped = layout.scaled | layout.shifted
    if mapped.isdisjoint(batch.slots_present):
        return
    columns = y.shape[-1]
    if layout.scaled:
        y.mul_(_to(layout.out_scale[batch.unit_slots, :columns], y))
    if layout.shifted:
        y.add_(_to(layout.out_shift[batch.unit_slots, :columns], y))
    for run in batch.weighted_runs:
        if run.slot in mapped:
            scale, shift = layout.output_map(run.slot, run.coef, columns)
            rows = y[run.start:run.end]
            if scale is not None:
                rows.mul_(_to(scale, y))
            if shift is not None:
                rows.add_(_to(shift, y))


def _add_grouped(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, batch: LoRABatch) -> None:
    """The decode runs gathered per slot: two batched matmuls for all adapters."""
    group = batch.grouped
    if group is None:
        return
    width = max(layout.widths[s] for s in group.slot_list)
    if width == 0:
        return
    lora_a, lora_b = layout.lora_a, layout.lora_b
    if group.slot_range is not None:
        a, b = lora_a[:group.slot_range, :width], lora_b[:group.slot_range, :width]
    else:
        a, b = lora_a[group.slots, :width], lora_b[group.slots, :width]
    xs = _to(x[group.index], lora_a)  # [S, L, in]
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)) * _to(group.weights, lora_a), b)  # [S, L, out]
    y.index_add_(0, group.index.view(-1), _to(delta.view(-1, delta.shape[-1]), y))


def _add_segments(y: torch.Tensor, x: torch.Tensor, layout: SlotLayout, segments: list[LoRASegment]) -> None:
    """One pair of matmuls per run (`slot` of a run is a row of lora_a: a virtual slot for experts)."""
    for seg in segments:
        width = layout.widths[seg.slot]
        if width:
            a, b = layout.lora_a[seg.slot, :width], layout.lora_b[seg.slot, :width, :y.shape[-1]]
            y[seg.start:seg.end] += _to(_weighted(_to(x[seg.start:seg.end], a) @ a.T, seg.coef) @ b, y)


def _weighted(shrunk: torch.Tensor, coef: float) -> torch.Tensor:
    """c · (x·Aᵀ): the coefficient scales the shrunk values, the smallest tensor of the pair."""
    return shrunk if coef == 1.0 else shrunk * coef


def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


@dataclass
class SlotTables:
    """Whole replacements of a vocabulary table (the embedding or the LM head) per slot: a slot's own table
    (modules_to_save, or a vocabulary resized for added tokens; it may have more rows than the base) or new
    values for some of its rows (trainable_token_indices). Allocated when an adapter enters a slot, dropped
    when it leaves: the memory is that of the adapters in slots."""

    tables: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # slot -> (ids, values)
    vocab: dict[int, int] = field(default_factory=dict)  # slot -> its vocabulary, where it adds tokens

    def fill(self, slot: int, table: torch.Tensor | None = None,
             rows: tuple[torch.Tensor, torch.Tensor] | None = None, vocab: int | None = None) -> None:
        self.clear(slot)
        if table is not None:
            self.tables[slot] = table
        if rows is not None:
            self.rows[slot] = rows
        if vocab is not None:
            self.vocab[slot] = vocab

    def clear(self, slot: int) -> None:
        self.tables.pop(slot, None)
        self.rows.pop(slot, None)
        self.vocab.pop(slot, None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values()) + sum(v.nbytes for _, v in self.rows.values())

    def width(self, batch: LoRABatch, base: int) -> int:
        """The largest vocabulary among the batch's slots (at least `base`)."""
        return max([base] + [self.vocab[s] for s in batch.slots_present if s in self.vocab])

    def lookup(self, h: torch.Tensor, token_ids: torch.Tensor, batch: LoRABatch) -> None:
        """Embedding: the rows of h of each replacing slot's tokens, read from its table, in place."""
        if not self.tables and not self.rows:
            return
        for run in batch.segments + batch.decode_runs:
            ids = token_ids[run.start:run.end]
            table = self.tables.get(run.slot)
            if table is not None:
                h[run.start:run.end] = _to(table[ids], h)
            replaced = self.rows.get(run.slot)
            if replaced is not None:
                match = ids[:, None] == replaced[0][None, :]  # [tokens, trained ids]
                hit = match.any(dim=1)
                h[run.start:run.end][hit] = _to(replaced[1][match[hit].int().argmax(dim=1)], h)

    def project(self, logits: torch.Tensor, h: torch.Tensor, batch: LoRABatch) -> None:
        """LM head: the logits of each replacing slot's rows, from its table (columns past its vocabulary
        stay as they are) or for its trained rows' columns, in place."""
        for run in batch.segments + batch.decode_runs:
            table = self.tables.get(run.slot)
            if table is not None:
                logits[run.start:run.end, :table.shape[0]] = _to(_to(h[run.start:run.end], table) @ table.T, logits)
            replaced = self.rows.get(run.slot)
            if replaced is not None:
                ids, values = replaced
                logits[run.start:run.end, ids] = _to(_to(h[run.start:run.end], values) @ values.T, logits)
