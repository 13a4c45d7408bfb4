"""The sampler against a plain per-row Python reference of vLLM's sampling semantics."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from loraserve.layers.sampler import Sampler, SamplingBatch, apply_penalties
from loraserve.sampling_params import SamplingParams

CPU = torch.device("cpu")


def make_batch(params, generators=None, prompts=None, outputs=None, eos=(0,)):
    n = len(params)
    return SamplingBatch.build(params, generators or [None] * n, prompts or [[] for _ in range(n)],
                               outputs or [[] for _ in range(n)], list(eos), CPU)


# ---- reference, one row at a time in Python floats ----

def ref_penalised(row: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    x = list(row)
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= p.frequency_penalty * count + p.presence_penalty
    return x


def ref_distribution(row: list[float], p: SamplingParams) -> dict[int, float]:
    """token -> probability after temperature, min_p, top_k, top_p (vLLM's order), renormalised."""
    scaled = [v / p.temperature for v in row]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    probs = [w / sum(weights) for w in weights]
    allowed = [t for t in range(len(row)) if probs[t] >= p.min_p * max(probs)]
    allowed.sort(key=lambda t: -probs[t])
    if p.top_k > 0:
        allowed = allowed[:p.top_k]
    mass = sum(probs[t] for t in allowed)
    nucleus, cum = [], 0.0
    for t in allowed:
        if cum >= p.top_p:
            break
        nucleus.append(t)
        cum += probs[t] / mass
    total = sum(probs[t] for t in nucleus)
    return {t: probs[t] / total for t in nucleus}


# ---- greedy ----

def test_greedy_and_top_k_one_are_argmax_including_in_mixed_batches():
    torch.manual_seed(0)
    logits = torch.randn(6, 50).bfloat16()
    greedy = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=1)] * 3
    batch = make_batch(greedy)
    assert batch.plain_greedy
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [max(range(50), key=lambda t: r[t]) for r in logits.float().tolist()]
    assert out.logprobs is None and out.top_ids is None

    mixed = greedy[:2] + [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(min_p=0.1)]
    out = Sampler()(logits[:4], make_batch(mixed))
    assert out.token_ids[:2].tolist() == logits[:2].float().argmax(dim=-1).tolist()


# ---- seeds ----

def run_steps(logits: torch.Tensor, params, seeds, steps: int,
              sampler: Sampler | None = None) -> list[list[int]]:
    """Sample `steps` times with fresh generators for the seeded rows; returns tokens per row."""
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    batch = make_batch(params, gens)
    sampler = sampler or Sampler()
    rows = [sampler(logits, batch).token_ids.tolist() for _ in range(steps)]
    return [list(col) for col in zip(*rows, strict=True)]


def test_seeded_row_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    vocab = 500
    row = torch.randn(1, vocab)
    mine = SamplingParams(temperature=1.3, top_k=100, top_p=0.95, seed=7)
    alone = run_steps(row, [mine], [7], steps=8)[0]

    others = [SamplingParams(temperature=0.5, min_p=0.05), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=3), SamplingParams(top_k=3)]
    logits = torch.cat([torch.randn(2, vocab), row, torch.randn(2, vocab)])
    params = others[:2] + [mine] + others[2:]
    in_batch = run_steps(logits, params, [None, None, 7, 3, None], steps=8)[2]
    assert in_batch == alone
    assert len(set(alone)) > 1  # the row really samples


def test_different_seeds_and_unseeded_rows_differ():
    logits = torch.zeros(4, 1000)  # uniform: two streams agreeing on 10 draws by chance is ~1e-30
    params = [SamplingParams(temperature=1.0)] * 4
    seeded = run_steps(logits, params, [1, 2, 1, None], steps=10)
    assert seeded[0] != seeded[1]
    assert seeded[0] == seeded[2]
    unseeded = run_steps(logits[:2], params[:2], [None, None], steps=10)
    assert unseeded[0] != unseeded[1]


# ---- top-k / top-p / min-p ----

FILTERS = [
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.5, min_p=0.3),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.2, top_p=0.99),  # wider than 6 tokens: window=1 must fall back to sorting
    SamplingParams(temperature=0.8, top_p=0.1),  # nucleus of the top token alone
    SamplingParams(temperature=1.0),
]


def chi_square(observed: Counter, expected: dict[int, float], draws: int) -> float:
    return sum((observed[t] - draws * q) ** 2 / (draws * q) for t, q in expected.items())


@pytest.mark.parametrize("seeded, window", [(False, 1024), (True, 1024), (False, 1)])
def test_filtered_sampling_matches_reference_distribution(seeded, window):
    """Each row keeps its own filters in one batch; draws stay in the allowed set with the right odds."""
    torch.manual_seed(2)
    vocab, draws = 10, 3000
    base = torch.randn(len(FILTERS), vocab) * 1.5
    logits = base.repeat(draws, 1)
    params = FILTERS * draws
    seeds = list(range(len(params))) if seeded else [None] * len(params)
    tokens = run_steps(logits, params, seeds, steps=1, sampler=Sampler(nucleus_window=window))
    for i, p in enumerate(FILTERS):
        expected = ref_distribution(base[i].tolist(), p)
        observed = Counter(tokens[j][0] for j in range(i, len(params), len(FILTERS)))
        assert set(observed) <= set(expected), f"row {i} sampled outside its allowed set"
        # 99.9% quantile of chi-square with 9 degrees of freedom is 27.9
        assert chi_square(observed, expected, draws) < 27.9, f"row {i}: {observed} vs {expected}"


def test_filters_on_a_large_vocab_stay_in_the_allowed_set():
    torch.manual_seed(3)
    vocab, repeats = 2000, 50
    base = torch.randn(len(FILTERS), vocab) * 3
    tokens = run_steps(base.repeat(repeats, 1), FILTERS * repeats, [None] * len(FILTERS) * repeats, steps=2)
    for i, p in enumerate(FILTERS[:-1]):
        allowed = set(ref_distribution(base[i].tolist(), p))
        drawn = {t for j in range(i, len(tokens), len(FILTERS)) for t in tokens[j]}
        assert drawn <= allowed


@pytest.mark.parametrize("scale", [0.3, 4.0])  # flat rows: nuclei of thousands of tokens; peaked: a few
def test_window_and_full_sort_give_the_same_draws(scale):
    """Whichever way the top-p nucleus is found (top-k window or full sort), masks and draws agree."""
    torch.manual_seed(6)
    vocab, repeats = 3000, 30
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=50, top_p=0.8),
              SamplingParams(temperature=1.5, top_p=0.5), SamplingParams(top_k=20),
              SamplingParams(temperature=0), SamplingParams(min_p=0.2, top_p=0.95), SamplingParams()]
    base = torch.randn(len(params), vocab) * scale
    batch_params = params * repeats
    draws = []
    for window in (1, 32, vocab):
        gens = [torch.Generator().manual_seed(i) for i in range(len(batch_params))]
        batch = make_batch(batch_params, gens)
        draws.append(Sampler(nucleus_window=window)(base.repeat(repeats, 1), batch).token_ids.tolist())
    assert draws[0] == draws[1] == draws[2]
    for i, p in enumerate(params[:-1]):
        allowed = set(ref_distribution(base[i].tolist(), p)) if not p.greedy else {int(base[i].argmax())}
        assert set(draws[0][i::len(params)]) <= allowed


# ---- penalties ----

def test_penalties_match_reference_formula():
    torch.manual_seed(4)
    vocab = 30
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=0.5),
              SamplingParams(presence_penalty=-0.7), SamplingParams(temperature=0),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=0.3, presence_penalty=0.4)]
    prompts = [[1, 2, 2, 9], [3, 4], [5], [1, 1, 1], [7, 8, 9, 10, 11]]
    outputs = [[4, 4, 20], [3, 3, 3, 6], [5, 29, 29], [], [7, 12, 12, 0]]
    logits = torch.randn(len(params), vocab).bfloat16()
    before = logits.clone()
    got = apply_penalties(logits, make_batch(params, prompts=prompts, outputs=outputs))
    rows = zip(logits.float().tolist(), params, prompts, outputs, strict=True)
    want = [ref_penalised(r, p, pr, out) for r, p, pr, out in rows]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, before)
    assert make_batch(params[3:4]).penalties is None  # no penalty row, no penalty tensors


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[0.0, 2.0, 1.9, 1.0]])
    out = [[1, 1]]
    greedy = SamplingParams(temperature=0, frequency_penalty=0.1)
    assert Sampler()(logits, make_batch([greedy], outputs=out)).token_ids.tolist() == [2]


# ---- min_tokens ----

def test_min_tokens_masks_eos_and_stop_ids():
    vocab = 20
    logits = torch.zeros(1, vocab)
    logits[0, [3, 5, 7, 11]] = torch.tensor([9.0, 8.0, 7.0, 6.0])  # eos 3 and 7, stop id 5
    rules = dict(min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    params = [SamplingParams(temperature=0, **rules), SamplingParams(temperature=0, **rules),
              SamplingParams(temperature=1.0, **rules)]
    outputs = [[1], [1, 2, 3], [1, 2]]
    out = Sampler()(logits.repeat(3, 1), make_batch(params, outputs=outputs, eos=(3, 7)))
    assert out.token_ids[:2].tolist() == [11, 3]

    sampled = make_batch(params[2:] * 2000, outputs=outputs[2:] * 2000, eos=(3, 7))
    drawn = set(Sampler()(logits.repeat(2000, 1), sampled).token_ids.tolist())
    assert drawn.isdisjoint({3, 5, 7}) and 11 in drawn


# ---- logprobs ----

def test_logprobs_ranks_and_top_k_come_from_raw_logits():
    torch.manual_seed(5)
    vocab = 40
    params = [SamplingParams(temperature=0), SamplingParams(logprobs=0, temperature=0.5),
              SamplingParams(logprobs=3, repetition_penalty=1.5), SamplingParams(logprobs=5, top_k=4),
              SamplingParams(logprobs=2, temperature=0, presence_penalty=1.0)]
    # distinct bf16 values, so the top-k order has no ties to break
    logits = torch.stack([torch.linspace(-3, 3, vocab)[torch.randperm(vocab)] for _ in params]).bfloat16()
    outputs = [[1], [2], [3, 3], [], [int(logits[4].float().argmax())]]
    out = Sampler()(logits, make_batch(params, outputs=outputs, prompts=[[4]] * len(params)))

    ref = torch.log_softmax(logits.float(), dim=-1)
    for row, token in enumerate(out.token_ids.tolist()):
        lp = ref[row].tolist()
        assert out.logprobs[row].item() == pytest.approx(lp[token], abs=1e-6)
        assert out.ranks[row].item() == 1 + sum(v > lp[token] for v in lp)
        top = sorted(range(vocab), key=lambda t: -lp[t])[:5]
        assert out.top_ids[row].tolist() == top
        torch.testing.assert_close(out.top_logprobs[row], ref[row, top])
    assert out.ranks[4].item() == 2  # the presence penalty moved the greedy pick off the raw argmax

    only_sampled = Sampler()(logits, make_batch([SamplingParams(logprobs=0)] * len(params)))
    assert only_sampled.top_ids is None and only_sampled.logprobs is not None


def test_build_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="output_token_ids has 1 rows but params has 2"):
        SamplingBatch.build([SamplingParams()] * 2, [None, None], [[], []], [[]], [0], CPU)
