"""The batched LoRA paths (C++ runs kernel on CPU, gathered bmm elsewhere) against a per-token reference:
y_t += x_t · A[slot_t]ᵀ · B[slot_t]."""
from __future__ import annotations

import random

import pytest
import torch

import loraserve.layers.lora_ops as ops
from loraserve.layers.cpu_kernels import lora_module
from loraserve.layers.forward_batch import LoRABatch
from loraserve.layers.lora_ops import DoRANorms, SlotLayout, SlotPart, add_lora

PATHS = ["kernel", "bmm"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run a test once through the C++ kernel and once through the portable bmm path."""
    if request.param == "kernel":
        assert lora_module() is not None, "the C++ LoRA kernel failed to build (see the warning logged)"
    else:
        monkeypatch.setattr(ops, "lora_module", lambda: None)
    return request.param


def single_part(lora_a, lora_b, widths):
    rows = torch.tensor([[[0, w]] for w in widths])
    return SlotLayout(lora_a, lora_b, list(widths), rows, torch.tensor([[0, lora_b.shape[-1]]]))


def reference(y, x, lora_a, lora_b, widths, token_slots):
    out = y.clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            w = widths[slot]
            out[t] += (x[t].to(lora_a.dtype) @ lora_a[slot, :w].T @ lora_b[slot, :w]).to(y.dtype)
    return out


def random_weights(num_slots, max_width, dim_in, dim_out, widths, dtype=torch.float32):
    lora_a = torch.zeros(num_slots, max_width, dim_in, dtype=dtype)
    lora_b = torch.zeros(num_slots, max_width, dim_out, dtype=dtype)
    for slot, w in enumerate(widths):
        lora_a[slot, :w] = torch.randn(w, dim_in, dtype=dtype)
        lora_b[slot, :w] = torch.randn(w, dim_out, dtype=dtype)
    return lora_a, lora_b


@pytest.mark.parametrize("seed", range(6))
def test_mixed_prefill_and_decode_tokens_match_reference(seed, path):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_slots, widths = 4, [8, 0, 24, 16]
    lora_a, lora_b = random_weights(num_slots, 24, 12, 20, widths)
    prefill = []
    for _ in range(rng.randint(0, 3)):
        prefill += [rng.choice([-1, 0, 1, 2, 3])] * rng.randint(1, 7)
    decode = sorted(rng.choice([-1, 0, 1, 2, 3]) for _ in range(rng.randint(0, 12)))
    token_slots = prefill + decode
    if not token_slots:
        token_slots = [0]
    x = torch.randn(len(token_slots), 12)
    y = torch.randn(len(token_slots), 20)
    expected = reference(y, x, lora_a, lora_b, widths, token_slots)
    batch = LoRABatch.build(token_slots, len(prefill), torch.device("cpu"))
    if batch is None:
        assert all(s < 0 for s in token_slots)
        return
    add_lora(y, x, single_part(lora_a, lora_b, widths), batch)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_parts_touch_only_their_columns(dtype, path):
    """A packed layer of three parts (out 6, 4, 4); slot 0 adapts parts 0 and 2 with ranks 3 and 2, slot 1
    only part 1 with rank 4. Each part's rank rows write only that part's columns."""
    torch.manual_seed(0)
    cols = [(0, 6), (6, 10), (10, 14)]
    slot_parts = [{0: 3, 2: 2}, {1: 4}]
    lora_a = torch.zeros(2, 6, 10, dtype=dtype)
    lora_b = torch.zeros(2, 6, 14, dtype=dtype)
    part_rows = torch.zeros(2, 3, 2, dtype=torch.long)
    for slot, parts in enumerate(slot_parts):
        offset = 0
        for part, rank in parts.items():
            lora_a[slot, offset:offset + rank] = torch.randn(rank, 10, dtype=dtype)
            start, end = cols[part]
            lora_b[slot, offset:offset + rank, start:end] = torch.randn(rank, end - start, dtype=dtype)
            part_rows[slot, part] = torch.tensor([offset, offset + rank])
            offset += rank
    widths = [5, 4]
    token_slots = [0, 0, 0, 0, 0, -1, 1, 1]
    x, y = torch.randn(8, 10, dtype=dtype), torch.randn(8, 14, dtype=dtype)
    expected = reference(y.float(), x.float(), lora_a.float(), lora_b.float(), widths, token_slots)
    layout = SlotLayout(lora_a, lora_b, widths, part_rows, torch.tensor(cols))
    add_lora(y, x, layout, LoRABatch.build(token_slots, 0, torch.device("cpu")))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(y.float(), expected, **tolerance)

    # SlotLayout.fill builds exactly this layout from each part's (A, B), and clear empties a slot again.
    filled = SlotLayout.allocate({"p0": 6, "p1": 4, "p2": 4}, 10, num_slots=2, max_rank=2, dtype=dtype,
                                 device=torch.device("cpu"))
    for slot, parts in enumerate(slot_parts):
        weights, offset = {}, 0
        for part, rank in parts.items():
            a = lora_a[slot, offset:offset + rank]
            b = lora_b[slot, offset:offset + rank, cols[part][0]:cols[part][1]].T
            weights[f"p{part}"] = SlotPart(a, b)
            offset += rank
        filled.fill(slot, weights)
    assert filled.widths == widths and torch.equal(filled.part_rows, part_rows)
    assert torch.equal(filled.part_cols, torch.tensor(cols))
    assert torch.equal(filled.lora_a, lora_a) and torch.equal(filled.lora_b, lora_b)
    filled.clear(0)
    assert filled.widths[0] == 0 and not filled.lora_a[0].any() and not filled.lora_b[0].any()


def test_grouping_slices_contiguous_slots_and_gathers_others():
    batch = LoRABatch.build([0, 0, 1, 2, 2, 2], 0, torch.device("cpu"))
    assert batch.segments == [] and batch.grouped.slot_range == 3
    assert batch.grouped.index.tolist() == [[0, 1, 0], [2, 2, 2], [3, 4, 5]]
    assert batch.kernel_runs[0].tolist() == [[0, 0, 2], [1, 2, 3], [2, 3, 6]]
    batch = LoRABatch.build([-1, 1, 3, 3], 0, torch.device("cpu"))
    assert batch.grouped.slot_range is None and batch.grouped.slot_list == [1, 3]


def test_kernel_takes_short_prefill_runs_and_leaves_long_ones_to_matmuls():
    longest = LoRABatch.KERNEL_MAX_RUN
    slots = [0] * (longest + 1) + [1] * 5 + [2, 1]
    batch = LoRABatch.build(slots, longest + 6, torch.device("cpu"))
    assert [(s.slot, s.start, s.end) for s in batch.long_segments] == [(0, 0, longest + 1)]
    assert batch.kernel_runs[0].tolist() == [[1, longest + 1, longest + 6], [2, longest + 6, longest + 7],
                                          [1, longest + 7, longest + 8]]


def test_base_only_batch_has_no_lora_work():
    assert LoRABatch.build([-1, -1, -1], 1, torch.device("cpu")) is None


def test_lora_dtype_differs_from_activations():
    torch.manual_seed(0)
    widths = [8, 8]
    lora_a, lora_b = random_weights(2, 8, 16, 16, widths, dtype=torch.float32)
    token_slots = [1, 1, 1, 0, 1]
    x = torch.randn(5, 16).bfloat16()
    y = torch.randn(5, 16).bfloat16()
    expected = reference(y, x, lora_a, lora_b, widths, token_slots)
    add_lora(y, x, single_part(lora_a, lora_b, widths), LoRABatch.build(token_slots, 3, torch.device("cpu")))
    torch.testing.assert_close(y.float(), expected.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dim_in", [583, 64])
def test_bf16_runs_of_every_length_and_rank_at_model_sizes(dim_in, path):
    """The kernel's register tiles (4 rows x 4 tokens, 16 x 1, 8 x 2; 64-column expand tiles with masked
    edges) at the sizes a model gives them, runs of 1 to 70 tokens, ranks 8 / 16 / 64 side by side, and a
    prefill chunk longer than the kernel takes, against float math on the same bf16 weights."""
    torch.manual_seed(1)
    parts = {"q": 100, "k": 70}
    ranks = [8, 16, 64]
    layout = SlotLayout.allocate(parts, dim_in, num_slots=3, max_rank=64, dtype=torch.bfloat16,
                                 device=torch.device("cpu"))
    for slot, rank in enumerate(ranks):
        layout.fill(slot, {name: SlotPart(torch.randn(rank, dim_in, dtype=torch.bfloat16) * 0.1,
                                          torch.randn(out, rank, dtype=torch.bfloat16) * 0.1)
                           for name, out in parts.items() if slot != 1 or name == "k"})
    longest = LoRABatch.KERNEL_MAX_RUN
    prefill = [2] * (longest + 3) + [0] * 17 + [1] * 70  # 70: the kernel splits a run into 32-token shrinks
    decode = [0] * 1 + [1] * 2 + [2] * 3 + [0, 0, 0, 0] + [-1] + [1] * 5 + [2] * 8
    token_slots = prefill + decode
    x = torch.randn(len(token_slots), dim_in, dtype=torch.bfloat16)
    y = torch.randn(len(token_slots), 170, dtype=torch.bfloat16)
    expected = reference(y.float(), x.float(), layout.lora_a.float(), layout.lora_b.float(), layout.widths,
                         token_slots)
    add_lora(y, x, layout, LoRABatch.build(token_slots, len(prefill), torch.device("cpu")))
    # one bf16 rounding of the sum (the kernel keeps x·Aᵀ in float; the matmul path rounds it to bf16 too)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coefficients_mixes_and_output_maps_per_lane(dtype, path):
    """Lanes of one adapter at coefficients 1, 0.5, 0 and of mixes, over a layout where slot 0 is DoRA on part
    q (its map depends on the coefficient: m / ‖W₀ + c·BA‖ and the base bias kept out), slot 1 only a lora_B
    bias on part k (scaled by c) and no factors, slot 2 factors on q and a trained-bias shift on k (not
    scaled): against y + Σ c·B(Ax), then each adapter's map at its c, token by token. Tokens of no lane and
    of coefficient 0 on plain factors are left exactly as they were."""
    torch.manual_seed(2)
    parts = {"q": 6, "k": 4}
    layout = SlotLayout.allocate(parts, 8, num_slots=3, max_rank=4, dtype=dtype, device=torch.device("cpu"))
    a, b, a2, b2 = (torch.randn(4, 8), torch.randn(6, 4) * 0.3, torch.randn(3, 8), torch.randn(6, 3) * 0.3)
    a, b, a2, b2 = (t.to(dtype).float() for t in (a, b, a2, b2))
    weight, base_bias = torch.randn(6, 8), torch.randn(6)
    lora = b @ a
    norms = DoRANorms(torch.linalg.norm(weight + lora, dim=1), weight.pow(2).sum(1), (weight * lora).sum(1),
                      lora.pow(2).sum(1))
    magnitude, lora_shift, fixed = torch.rand(6) + 0.5, torch.randn(4), torch.randn(4)
    layout.fill(0, {"q": SlotPart(a.to(dtype), b.to(dtype), magnitude, norms, base_bias)})
    layout.fill(1, {"k": SlotPart(lora_shift=lora_shift)})
    layout.fill(2, {"q": SlotPart(a2.to(dtype), b2.to(dtype)), "k": SlotPart(fixed_shift=fixed)})
    lanes = [((0, 1.0),), ((0, 0.5),), ((1, 2.0),), ((1, 1.0), (2, 0.5)), ((2, 0.0),), ((0, 2.0),), ((2, 1.0),)]
    token_lanes = [0, 0, 1, 2, -1, 3, 3, 4, 0, 5, 3, 6, 1, 4]
    x, y = torch.randn(len(token_lanes), 8, dtype=dtype), torch.randn(len(token_lanes), 10, dtype=dtype)
    expected = y.float().clone()
    factors = {0: (a, b), 2: (a2, b2)}
    for t, lane in enumerate(token_lanes):
        for slot, coef in lanes[lane] if lane >= 0 else ():
            if slot in factors:
                expected[t, :6] += coef * (x[t].float() @ factors[slot][0].T @ factors[slot][1].T)
        for slot, coef in lanes[lane] if lane >= 0 else ():
            if slot == 0:
                scale = magnitude / norms.at(coef)
                expected[t, :6] = expected[t, :6] * scale + (1 - scale) * base_bias
            if slot == 1:
                expected[t, 6:] += coef * lora_shift
            if slot == 2:
                expected[t, 6:] += fixed
    untouched = [t for t, lane in enumerate(token_lanes) if lane in (-1, 4)]
    before = y[untouched].clone()
    add_lora(y, x, layout, LoRABatch.build(token_lanes, 5, torch.device("cpu"), lanes))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(y.float(), expected, **tolerance)
    assert torch.equal(y[[t for t in untouched if token_lanes[t] == -1]], before[[
        i for i, t in enumerate(untouched) if token_lanes[t] == -1]])
    assert torch.equal(y[untouched][:, :6], before[:, :6])  # coefficient 0: the q rank term adds exactly nothing
    for slot in range(3):
        layout.clear(slot)
    assert not layout.scaled and not layout.shifted and not layout.weighted
    assert (layout.out_scale == 1).all() and not layout.out_shift.any()


@pytest.mark.parametrize("seed", range(4))
def test_runs_from_sequence_spans_equal_runs_from_tokens(seed):
    """The model runner hands each sequence's (lane, tokens) span; the runs are those of the per-token lanes,
    adjacent spans of one lane joined, split where the decode tokens begin."""
    rng = random.Random(seed)
    lanes = [((0, 1.0),), ((1, 0.5),), ((0, 1.0), (2, 0.25))]
    spans = [(rng.choice([-1, 0, 1, 2]), rng.randint(1, 9)) for _ in range(rng.randint(1, 8))]
    tokens = [lane for lane, count in spans for _ in range(count)]
    grouped_from = rng.randint(0, len(tokens))
    by_spans = LoRABatch.from_spans(spans, grouped_from, torch.device("cpu"), lanes)
    by_tokens = LoRABatch.build(tokens, grouped_from, torch.device("cpu"), lanes)
    if by_tokens is None:
        assert by_spans is None
        return
    assert (by_spans.segments, by_spans.decode_runs, by_spans.token_lanes) == \
        (by_tokens.segments, by_tokens.decode_runs, tokens)
    expected = []  # the per-token reference: every maximal stretch of one lane, cut at grouped_from
    for t, lane in enumerate(tokens):
        if lane >= 0 and (t == 0 or tokens[t - 1] != lane or t == grouped_from):
            end = t + 1
            while end < len(tokens) and tokens[end] == lane and end != grouped_from:
                end += 1
            expected += [(slot, t, end, coef) for slot, coef in lanes[lane]]
    got = [(r.slot, r.start, r.end, r.coef) for r in by_spans.segments + by_spans.decode_runs]
    assert got == expected
