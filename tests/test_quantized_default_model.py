"""Quantized bases on the real default model, as a user gets them (bf16): the resident memory they save, the
numerics of their kernels, and how much of the model the on-the-fly quantizers keep.

- Memory: a fresh process per scheme builds the engine with a small fixed KV cache and reads its own resident
  memory; what a quantized scheme saves against dense bf16 must be what its weight bytes save.
- Numerics: top-5 logprobs of greedy runs at batch 8 (the tiled path) and batch 1 (the few-token path) against
  transformers fp32 on the very weights the engine holds, de-quantized; the bound is dense bf16's drift
  from fp32 on its own weights, measured in the same module, at the same batch size.
- Quality: greedy agreement with transformers fp32 on the float original, per step (teacher-forced on the
  engine's tokens, every step counted): int8 within 0.05 of dense bf16's, int4 within 0.15. The agreement up to
  the first differing token is printed too; it is no measure for a bound: two bf16 paths on identical weights
  (dense and GGUF here) differ in it by 0.05-0.10 over 48 prompts, one early difference costing a whole tail.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraserve import LLM, SamplingParams
from test_quantized_models import served_state

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "To make a cup of tea, first", "In 1969, the first humans",
           "Photosynthesis is the process by which", "My favourite programming language is"]
TOKENS = 24
PARAMS = SamplingParams(temperature=0, max_tokens=TOKENS, logprobs=5, ignore_eos=True)
ENGINE = dict(dtype="bfloat16", max_model_len=256, num_kv_blocks=64, block_size=16)
AGREEMENT_LOSS = {"int8": 0.05, "int4": 0.15, "gguf": 0.05}


@pytest.fixture(scope="module")
def hf(default_model_path):
    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


def run(llm: LLM, batch: int) -> list:
    """Greedy outputs of every prompt, `batch` requests at a time."""
    outputs = []
    for start in range(0, len(PROMPTS), batch):
        outputs += llm.generate(PROMPTS[start:start + batch], PARAMS, use_tqdm=False)
    return outputs


def measure(outputs, reference) -> tuple[list[float], float, float]:
    """|logprob - fp32 logprob| over every top-5 entry (sorted), and two greedy agreements with `reference`,
    teacher-forced on the engine's tokens: the share of tokens before the first that is not the reference's
    argmax (where the two greedy runs part), and the share of all steps whose token is the reference's argmax
    given the same context. The first swings by ±0.05 between two bf16 paths on the same weights (one early
    difference costs a prompt's whole tail); the second counts every step and so compares schemes."""
    diffs, agreed, steps = [], 0, 0
    for out in outputs:
        tokens = out.prompt_token_ids + out.outputs[0].token_ids
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0, len(out.prompt_token_ids) - 1:-1].float()
        expected = torch.log_softmax(logits, dim=-1)
        for position, top in enumerate(out.outputs[0].logprobs):
            diffs += [abs(lp.logprob - expected[position, token].item()) for token, lp in top.items()]
        same = (logits.argmax(dim=-1) == torch.tensor(out.outputs[0].token_ids)).tolist()
        agreed += (same + [False]).index(False)
        steps += sum(same)
    return sorted(diffs), agreed / (TOKENS * len(outputs)), steps / (TOKENS * len(outputs))


def summary(diffs: list[float]) -> tuple[float, float]:
    return statistics.mean(diffs), diffs[int(len(diffs) * 0.9)]


@pytest.fixture(scope="module")
def dense(default_model_path, hf):
    """Dense bf16's drift (mean, p90) per batch size, and its agreements, against fp32 on its own weights."""
    llm = LLM(str(default_model_path), **ENGINE)
    measured = {batch: measure(run(llm, batch), hf) for batch in (8, 1)}
    return {batch: (summary(diffs), *agreements) for batch, (diffs, *agreements) in measured.items()}


def served_weights(llm: LLM, hf):
    """transformers' model with every linear (and a quantized embedding table / LM head) replaced by what the
    engine holds, de-quantized (float32)."""
    model = copy.deepcopy(hf)
    state = served_state(llm)
    assert set(state) <= set(model.state_dict())
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.parametrize("scheme", ["gguf", "int8", "int4"])
def test_quantized_bf16_drifts_no_more_than_dense_bf16(default_model_path, hf, dense, scheme):
    llm = LLM(quantization=scheme, **ENGINE) if scheme == "gguf" else LLM(str(default_model_path),
                                                                         quantization=scheme, **ENGINE)
    reference = served_weights(llm, hf)
    for batch in (8, 1):
        outputs = run(llm, batch)
        diffs, _, _ = measure(outputs, reference)
        _, prefix, steps = measure(outputs, hf)
        (mean, p90), ((dense_mean, dense_p90), dense_prefix, dense_steps) = summary(diffs), dense[batch]
        print(f"{scheme} batch {batch}: drift from fp32 on its own weights (mean / p90 nats) {mean:.3f} / {p90:.3f},"
              f" dense bf16 {dense_mean:.3f} / {dense_p90:.3f}; greedy agreement with the float model per step "
              f"{steps:.3f} (dense bf16 {dense_steps:.3f}), to the first difference {prefix:.2f} ({dense_prefix:.2f})")
        assert mean <= 1.1 * dense_mean + 0.01 and p90 <= 1.1 * dense_p90 + 0.02
        assert steps >= dense_steps - AGREEMENT_LOSS[scheme]


CHILD = """
import json, sys
from loraserve import LLM
from loraserve.engine.platform import resident_bytes
before = resident_bytes()
llm = LLM(sys.argv[1] or None, quantization=sys.argv[2] or None, **json.loads(sys.argv[3]))
print(json.dumps({"rss": resident_bytes() - before, "weights": llm.engine.weight_bytes,
                  "model_rss": llm.engine.model_resident_bytes}))
"""


def resident(model: str, scheme: str) -> dict:
    """What building an engine adds to a fresh process's resident memory, and the weight bytes it holds."""
    result = subprocess.run([sys.executable, "-c", CHILD, model, scheme, json.dumps(ENGINE)], check=False,
                            capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dense_resident(default_model_path) -> dict:
    return resident(str(default_model_path), "")


@pytest.mark.parametrize("scheme", ["int8", "int4", "gguf"])
def test_quantized_schemes_save_the_resident_memory_of_their_weights(default_model_path, dense_resident, scheme):
    dense = dense_resident
    quantized = resident("" if scheme == "gguf" else str(default_model_path), scheme)
    saved, promised = dense["rss"] - quantized["rss"], dense["weights"] - quantized["weights"]
    print(f"{scheme}: resident memory added {quantized['rss'] / 2**20:.0f} MiB vs dense {dense['rss'] / 2**20:.0f}; "
          f"saved {saved / 2**20:.0f} MiB of the {promised / 2**20:.0f} MiB its weights save")
    assert promised > 0.25 * dense["weights"] and saved >= 0.9 * promised
    # the model alone: its resident memory is its weights (within what the loader's own code pages take)
    assert quantized["model_rss"] <= quantized["weights"] + 32 * 2**20
