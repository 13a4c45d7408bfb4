"""Per-request sampling settings through the LLM API on a tiny model, against transformers' logits and
the stopping and penalty rules written out plainly here."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import pytest
import torch
import transformers

from loraserve import LLM, SamplingParams
from tiny_models import make_sharp_tiny_model

PROMPTS = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy dog"]
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=4)
STEPS = 24

Adjust = Callable[[torch.Tensor, list[int]], torch.Tensor]  # (next-token logits, output so far) -> logits


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_sharp_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def hf(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(str(model_path), **ENGINE_ARGS)


def encode(llm: LLM, prompt: str) -> list[int]:
    return llm.get_tokenizer().encode(prompt)


def reference_greedy(hf, prompt_ids: list[int], steps: int = STEPS, adjust: Adjust | None = None) -> list[int]:
    """Greedy decoding with transformers' logits of the whole sequence at every step, optionally adjusted."""
    output: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + output])).logits[0, -1]
        if adjust is not None:
            logits = adjust(logits, output)
        output.append(int(logits.argmax()))
    return output


def greedy(max_tokens: int = STEPS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def completion(llm: LLM, prompt, params: SamplingParams):
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


# ---- greedy, prompt formats, ordering ----

def test_prompts_as_text_and_token_ids_come_back_in_input_order(llm, hf):
    ids = [encode(llm, p) for p in PROMPTS]
    prompts = [PROMPTS[0], {"prompt_token_ids": ids[1]}, PROMPTS[2]]
    max_tokens = [STEPS, 4, 12]  # the first finishes last
    outputs = llm.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
    assert [o.prompt for o in outputs] == [PROMPTS[0], None, PROMPTS[2]]
    for output, prompt_ids, m in zip(outputs, ids, max_tokens, strict=True):
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == reference_greedy(hf, prompt_ids, m)


def test_top_k_one_is_greedy(llm, hf):
    params = SamplingParams(temperature=0.8, top_k=1, max_tokens=STEPS, ignore_eos=True)
    assert completion(llm, PROMPTS[0], params).token_ids == reference_greedy(hf, encode(llm, PROMPTS[0]))


# ---- seeded and multiple samples ----

def test_seeded_sampling_is_reproducible_alone_and_inside_any_batch(llm, hf):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = completion(llm, PROMPTS[0], seeded).token_ids
    assert completion(llm, PROMPTS[0], seeded).token_ids == alone
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), greedy(8),
              SamplingParams(temperature=0.9, seed=99, max_tokens=16, ignore_eos=True)]
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]], [others[0], seeded, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert batch[3].outputs[0].token_ids != alone  # same prompt, other seed
    reseeded = SamplingParams(temperature=1.0, seed=4321, max_tokens=16, ignore_eos=True)
    assert completion(llm, PROMPTS[0], reseeded).token_ids != alone
    assert alone != reference_greedy(hf, encode(llm, PROMPTS[0]), 16)


@pytest.mark.parametrize("seed", [None, 3])
def test_n_returns_that_many_distinct_completions(llm, seed):
    params = SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=16, ignore_eos=True)
    outputs = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs
    assert [c.index for c in outputs] == [0, 1]
    assert all(len(c.token_ids) == 16 and c.finish_reason == "length" for c in outputs)
    assert outputs[0].token_ids != outputs[1].token_ids


# ---- stopping ----

@pytest.fixture(scope="module")
def greedy_run(llm):
    """The unstopped greedy completion that the stop tests cut."""
    return completion(llm, PROMPTS[2], greedy(32))


def first_printable_pair(text: str, start: int) -> str:
    """The first two-character printable ASCII window of `text` whose first occurrence is at or after start."""
    for i in range(start, len(text) - 1):
        pair = text[i:i + 2]
        if pair.isascii() and pair.isprintable() and text.find(pair) == i:
            return pair
    raise AssertionError(f"no printable pair after {start} in {text!r}; pick another prompt")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_text_exactly(llm, greedy_run, include):
    text = greedy_run.text
    stop = first_printable_pair(text, 3)
    later = first_printable_pair(text, text.find(stop) + 2)
    position = text.find(stop)
    params = greedy(32, stop=[later, stop], include_stop_str_in_output=include)
    result = completion(llm, PROMPTS[2], params)
    assert result.text == (text[:position + len(stop)] if include else text[:position])
    assert result.finish_reason == "stop" and result.stop_reason == stop
    assert result.token_ids == greedy_run.token_ids[:len(result.token_ids)]
    assert llm.get_tokenizer().decode(result.token_ids).endswith(stop)  # no token generated past the stop


def test_stop_token_id_ends_the_completion_with_that_token(llm, greedy_run):
    tokens = greedy_run.token_ids
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    result = completion(llm, PROMPTS[2], greedy(32, stop_token_ids=[tokens[k]]))
    assert result.token_ids == tokens[:k + 1]
    assert result.finish_reason == "stop" and result.stop_reason == tokens[k]


def test_max_tokens_ends_with_length(llm, greedy_run):
    result = completion(llm, PROMPTS[2], greedy(5))
    assert result.token_ids == greedy_run.token_ids[:5]
    assert result.finish_reason == "length" and result.stop_reason is None


def test_eos_stops_only_after_min_tokens(model_path, hf, greedy_run, tmp_path):
    """A copy of the model whose config also names an early greedy token as EOS: plain greedy stops at it;
    with min_tokens it is banned until min_tokens are out (transformers greedy with that token masked)."""
    tokens = greedy_run.token_ids
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    eos = tokens[k]
    folder = shutil.copytree(model_path, tmp_path / "eos")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [2, eos]
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(str(folder), **ENGINE_ARGS)
    plain = completion(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=32))
    assert plain.token_ids == tokens[:k + 1]
    assert plain.finish_reason == "stop" and plain.stop_reason is None

    min_tokens = k + 4

    def ban_eos_early(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
        if len(output) < min_tokens:
            logits = logits.clone()
            logits[[2, eos]] = float("-inf")
        return logits

    expected = reference_greedy(hf, encode(llm, PROMPTS[2]), 32, ban_eos_early)
    assert eos in expected[min_tokens:]  # so the EOS is reached again once allowed
    expected = expected[:expected.index(eos, min_tokens) + 1]
    result = completion(llm, PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, min_tokens=min_tokens))
    assert result.token_ids == expected
    assert result.finish_reason == "stop" and len(result.token_ids) > min_tokens


# ---- logprobs ----

@pytest.mark.parametrize("top", [0, 3])
def test_logprobs_are_log_softmax_of_the_model_logits(llm, hf, top):
    """Sampled at temperature 0.7, but logprobs describe the raw model distribution (vLLM's default)."""
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True, logprobs=top)
    result = completion(llm, PROMPTS[0], params)
    prompt_ids = encode(llm, PROMPTS[0])
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + result.token_ids])).logits[0, len(prompt_ids) - 1:-1]
    expected = logits.log_softmax(dim=-1)
    assert len(result.logprobs) == len(result.token_ids) == 12
    total = 0.0
    for row, token, entry in zip(expected, result.token_ids, result.logprobs, strict=True):
        top_ids = row.topk(top).indices.tolist()
        assert set(entry) == set(top_ids) | {token}
        for rank, token_id in enumerate(top_ids, start=1):
            assert entry[token_id].rank == rank
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        total += entry[token].logprob
    assert result.cumulative_logprob == pytest.approx(total, abs=1e-4)


# ---- penalties ----

def penalised(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float = 0.0,
              frequency: float = 0.0, repetition: float = 1.0) -> torch.Tensor:
    """vLLM/OpenAI: repetition divides positive and multiplies negative logits of tokens seen in the prompt
    or output; frequency subtracts per output occurrence; presence once per token that occurred."""
    x = logits.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] -= frequency * output.count(t) + presence
    return x


# Each case was checked to separate the formula from a plausible miswiring: presence also charged to prompt
# tokens, frequency counted once per token (negative, so tokens do repeat), repetition blind to the prompt.
@pytest.mark.parametrize("prompt, penalty", [
    (PROMPTS[0], dict(presence=1.5)), (PROMPTS[0], dict(frequency=-0.6)), (PROMPTS[0], dict(repetition=0.6)),
    (PROMPTS[2], dict(repetition=1.8)), (PROMPTS[0], dict(presence=0.5, frequency=-0.4, repetition=1.3)),
], ids=["presence", "negative-frequency", "repetition-below-1", "repetition-of-prompt", "all-three"])
def test_penalised_greedy_matches_the_penalty_formula(llm, hf, prompt, penalty):
    prompt_ids = encode(llm, prompt)
    expected = reference_greedy(hf, prompt_ids,
                                adjust=lambda logits, out: penalised(logits, prompt_ids, out, **penalty))
    assert expected != reference_greedy(hf, prompt_ids)  # the penalty changes the text
    names = dict(presence="presence_penalty", frequency="frequency_penalty", repetition="repetition_penalty")
    params = greedy(**{names[k]: v for k, v in penalty.items()})
    assert completion(llm, prompt, params).token_ids == expected


# ---- errors ----

@pytest.mark.parametrize("prompt, params, message", [
    ("x" * 200, greedy(4), "prompt has 200 tokens but this model's maximum context length is 128"),
    ("x" * 20, greedy(120), "lower max_tokens to at most 108"),
    ("", greedy(4), "prompt is empty"),
    ({"prompt_token_ids": []}, greedy(4), "prompt is empty"),
    ({"prompt_token_ids": [5, 272]}, greedy(4), r"prompt token ids must be integers in \[0, 272\)"),
    ({"prompt_token_ids": [5, "6"]}, greedy(4), r"prompt token ids must be integers in \[0, 272\)"),
], ids=["prompt-too-long", "max-tokens-too-many", "empty-text", "empty-ids", "id-outside-vocab", "id-not-int"])
def test_requests_that_cannot_run_are_refused_and_the_engine_keeps_working(llm, hf, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["A fine prompt", prompt], [greedy(4), params], use_tqdm=False)
    engine = llm.engine
    assert not engine.has_unfinished_requests()  # the valid prompt queued first was withdrawn
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert completion(llm, PROMPTS[1], greedy(8)).token_ids == reference_greedy(hf, encode(llm, PROMPTS[1]), 8)


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1), "temperature must be non-negative"),
                                             (dict(top_p=0), r"top_p must be in \(0, 1\]")])
def test_bad_sampling_params_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
