"""The batched sampler against per-row references written plainly with Python floats and loops."""
from __future__ import annotations

import math

import pytest
import torch

from loraserve.layers.sampler import Sampler, SamplingBatch, apply_penalties
from loraserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
sampler = Sampler()


def make_batch(params, outputs=None, prompts=None, generators=None, eos=(0,)):
    n = len(params)
    return SamplingBatch.build(params, generators or [None] * n, prompts or [[]] * n,
                               outputs or [[]] * n, list(eos), CPU)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The renormalised distribution a random row samples from: temperature, min_p, top-k, top-p."""
    z = [v / temperature for v in logits]
    peak = max(z)
    p = [math.exp(v - peak) for v in z]
    total = sum(p)
    p = [v / total for v in p]
    kept = [i for i in range(len(p)) if p[i] >= min_p * max(p)]
    kept.sort(key=lambda i: -z[i])
    if top_k:
        kept = kept[:top_k]
    mass = sum(p[i] for i in kept)
    nucleus, before = [], 0.0
    for i in kept:
        if before < top_p:
            nucleus.append(i)
        before += p[i] / mass
    mass = sum(p[i] for i in nucleus)
    return {i: p[i] / mass for i in nucleus}


def test_greedy_and_top_k_one_are_argmax():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(6, 50).to(dtype)
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1)] * 3
        out = sampler(logits, make_batch(params))
        assert out.token_ids.tolist() == [max(range(50), key=lambda j: float(row[j])) for row in logits]


def test_greedy_rows_in_a_mixed_batch_stay_argmax():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_p=0.9)] * 2
    for _ in range(5):
        out = sampler(logits, make_batch(params))
        assert out.token_ids[0::2].tolist() == logits[0::2].argmax(-1).tolist()


def test_sampler_does_not_modify_the_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = [SamplingParams(temperature=0.8, top_k=5, top_p=0.7, min_p=0.1, repetition_penalty=1.3,
                             frequency_penalty=0.5, min_tokens=3)] * 3
    sampler(logits, make_batch(params, outputs=[[1, 2], [3], []], prompts=[[4], [5], [6]]))
    assert torch.equal(logits, before)


def test_seeded_row_is_independent_of_its_batch_mates():
    torch.manual_seed(3)
    row_logits = torch.randn(1, 200)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    alone_gen = seeded(7)
    alone = [sampler(row_logits, make_batch([params], generators=[alone_gen])).token_ids.item()
             for _ in range(10)]

    others = torch.randn(5, 200)
    logits = torch.cat([others[:3], row_logits, others[3:]])
    mates = [SamplingParams(temperature=0.5, top_k=20), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.2, seed=11), params, SamplingParams(min_p=0.2),
             SamplingParams(temperature=0.9, top_p=0.5, frequency_penalty=1.0)]
    gens = [None, None, seeded(11), seeded(7), None, None]
    in_batch = [sampler(logits, make_batch(mates, generators=gens, outputs=[[1, 2]] * 6)).token_ids[3].item()
                for _ in range(10)]
    assert in_batch == alone
    assert len(set(alone)) > 1  # a real random stream, not a constant


def test_different_seeds_give_different_streams():
    logits = torch.zeros(2, 1000)
    params = [SamplingParams(seed=1), SamplingParams(seed=2)]
    gens = [seeded(1), seeded(2)]
    draws = [sampler(logits, make_batch(params, generators=gens)).token_ids.tolist() for _ in range(5)]
    assert [d[0] for d in draws] != [d[1] for d in draws]


FILTERS = [
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.3),
    dict(temperature=0.9, top_k=5, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("settings", FILTERS)
def test_filtered_sampling_matches_the_reference_distribution(settings):
    torch.manual_seed(4)
    row = torch.randn(8) * 1.5
    expected = reference_distribution(row.tolist(), **settings)
    draws = 20000
    logits = row.expand(draws, -1).contiguous()
    params = [SamplingParams(**settings)] * draws
    tokens = sampler(logits, make_batch(params)).token_ids
    counts = torch.bincount(tokens, minlength=8).tolist()
    assert {i for i, c in enumerate(counts) if c} <= set(expected)
    chi2 = sum((counts[i] - draws * p) ** 2 / (draws * p) for i, p in expected.items())
    assert chi2 < 30.0, (counts, expected)  # ~p=1e-4 for the at most 7 degrees of freedom here


def test_filters_are_per_row_in_a_mixed_batch():
    torch.manual_seed(5)
    rows = torch.randn(len(FILTERS), 40) * 2
    params = [SamplingParams(**s) for s in FILTERS] + [SamplingParams(temperature=0.0)]
    logits = torch.cat([rows, rows[:1]])
    allowed = [set(reference_distribution(r, **s)) for r, s in zip(rows.tolist(), FILTERS)]
    for _ in range(300):
        tokens = sampler(logits, make_batch(params)).token_ids.tolist()
        assert all(t in a for t, a in zip(tokens, allowed))
        assert tokens[-1] == rows[0].argmax().item()


def reference_penalties(logits, prompt, output, repetition, frequency, presence):
    row = list(logits)
    for t in range(len(row)):
        if t in prompt or t in output:
            row[t] = row[t] / repetition if row[t] > 0 else row[t] * repetition
        row[t] -= frequency * output.count(t)
        row[t] -= presence * (1.0 if t in output else 0.0)
    return row


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.7), dict(repetition_penalty=0.6),
                                     dict(frequency_penalty=0.8), dict(presence_penalty=-1.1),
                                     dict(repetition_penalty=1.2, frequency_penalty=-0.4,
                                          presence_penalty=1.5)])
def test_penalties_match_the_formula(penalty):
    torch.manual_seed(6)
    logits = torch.randn(3, 12)
    prompts = [[1, 2, 2, 5], [0, 11], [3]]
    outputs = [[2, 7, 7, 7, 9], [], [3, 4, 4]]
    params = [SamplingParams(**penalty), SamplingParams(**penalty), SamplingParams(temperature=0.0)]
    got = apply_penalties(logits, make_batch(params, outputs=outputs, prompts=prompts))
    plain = dict(repetition=1.0, frequency=0.0, presence=0.0)
    for r in range(3):
        settings = {**plain, **{k.split("_")[0]: v for k, v in penalty.items()}} if r < 2 else plain
        want = reference_penalties(logits[r].tolist(), prompts[r], outputs[r], **settings)
        torch.testing.assert_close(got[r], torch.tensor(want))


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0)]
    assert sampler(logits, make_batch(params, outputs=[[1]])).token_ids.item() == 2
    assert sampler(logits, make_batch(params, outputs=[[]])).token_ids.item() == 1


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.5]] * 3)
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2]),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2], ignore_eos=True),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])]
    outputs = [[3], [], [3, 3]]
    tokens = sampler(logits, make_batch(params, outputs=outputs, eos=(0,))).token_ids.tolist()
    assert tokens == [3, 3, 0]

    random_params = [SamplingParams(temperature=2.0, min_tokens=5, stop_token_ids=[2])] * 2000
    tokens = sampler(logits[:1].expand(2000, -1), make_batch(random_params, eos=(0, 4))).token_ids
    assert not set(tokens.tolist()) & {0, 2, 4}
    assert set(tokens.tolist()) == {1, 3}


def test_logprobs_ranks_and_top_logprobs_come_from_raw_logits():
    torch.manual_seed(7)
    logits = torch.randn(4, 25).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.5, logprobs=5),
              SamplingParams(temperature=0.5, top_k=4, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0)]
    out = sampler(logits, make_batch(params, outputs=[[1]] * 4, prompts=[[2]] * 4))
    reference = torch.log_softmax(logits.float(), dim=-1)
    for r, token in enumerate(out.token_ids.tolist()):
        row = reference[r].tolist()
        assert out.logprobs[r].item() == pytest.approx(row[token], abs=1e-6)
        assert out.ranks[r].item() == sum(1 for v in row if v >= row[token])
        best = sorted(range(25), key=lambda j: -row[j])[:5]
        torch.testing.assert_close(out.top_logprobs[r], torch.tensor([row[j] for j in best]))
        assert sorted(out.top_ids[r].tolist()) == sorted(best)
    assert out.ranks[0].item() == 1


def test_logprob_outputs_are_absent_unless_asked():
    logits = torch.randn(2, 10)
    out = sampler(logits, make_batch([SamplingParams(temperature=0.0)] * 2))
    assert out.logprobs is None and out.ranks is None and out.top_ids is None
    out = sampler(logits, make_batch([SamplingParams(temperature=0.0, logprobs=0), SamplingParams()]))
    assert out.logprobs is not None and out.ranks is not None and out.top_ids is None


def test_build_rejects_lists_of_the_wrong_length():
    with pytest.raises(ValueError, match="one entry per sampled row"):
        SamplingBatch.build([SamplingParams()] * 2, [None], [[], []], [[], []], [0], CPU)
    with pytest.raises(ValueError, match="num_rows=2"):
        sampler(torch.zeros(3, 5), make_batch([SamplingParams()] * 2))
