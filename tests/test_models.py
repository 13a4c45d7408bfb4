"""Every supported architecture against transformers on the same saved weights (float32), and the
engine's scheduling (continuous batching, chunked prefill, preemption, abort) against the tokens each
request gets from transformers alone."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from loraserve import LLM, SamplingParams
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.engine.sequence import Sequence
from tiny_models import ARCHITECTURES, make_sharp_tiny_model

NEW_TOKENS = 32
PROMPTS = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy dog; then it",
           "0123456789 counting: 10 11 12 13 14 15 16 17 18 19 20 21 22"]
# Small cache geometry so sequences span several blocks and decode tables need padding.
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=4)


@dataclass
class Tiny:
    path: Path
    hf: transformers.PreTrainedModel
    llm: LLM
    _greedy: dict[str, list[int]]

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.llm.get_tokenizer().encode(prompt)

    def greedy(self, prompt: str) -> list[int]:
        """transformers' greedy continuation of NEW_TOKENS tokens (EOS suppressed by min_new_tokens)."""
        if prompt not in self._greedy:
            out = self.hf.generate(torch.tensor([self.prompt_ids(prompt)]), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            self._greedy[prompt] = out[0, -NEW_TOKENS:].tolist()
        return self._greedy[prompt]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> Tiny, each model built once for the module."""
    built: dict[str, Tiny] = {}

    def get(arch: str) -> Tiny:
        if arch not in built:
            path = make_sharp_tiny_model(arch, tmp_path_factory.mktemp(arch))
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            built[arch] = Tiny(path, hf, LLM(str(path), **ENGINE_ARGS), {})
        return built[arch]

    return get


def greedy_params(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)


def feed(llm: LLM, work: list[tuple[Sequence, int]]) -> dict[Sequence, dict[int, torch.Tensor]]:
    """Run one model-runner step feeding each sequence its next `n` tokens; return the logits of every
    fed position (not only the sampled ones), keyed by sequence and position."""
    engine = llm.engine
    for seq, n in work:
        engine.blocks.allocate(seq, n)
    batch, _ = engine.runner.build_batch([ScheduledSeq(seq, n) for seq, n in work], {})
    batch.logits_indices = torch.arange(len(batch.input_ids))
    logits = engine.model(batch)
    owner = {block: seq for seq, _ in work for block in seq.block_table}
    block_size = engine.blocks.block_size
    found: dict[Sequence, dict[int, torch.Tensor]] = defaultdict(dict)
    slots, positions = batch.attention.slot_mapping.tolist(), batch.positions.tolist()
    for row, (slot, position) in enumerate(zip(slots, positions, strict=True)):
        found[owner[slot // block_size]][position] = logits[row]
    for seq, n in work:
        seq.num_computed_tokens += n
    return found


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefill_chunked_prefill_and_decode_logits_match_transformers(tiny, arch):
    """Two sequences share every step: A is prefilled whole, B in two chunks (the second attends to
    cached K/V), then both decode together, crossing block boundaries at different steps."""
    model = tiny(arch)
    generator = torch.Generator().manual_seed(1)
    full = {"A": model.prompt_ids(PROMPTS[2]) + torch.randint(3, 272, (6,), generator=generator).tolist(),
            "B": model.prompt_ids(PROMPTS[3]) + torch.randint(3, 272, (6,), generator=generator).tolist()}
    prompt_len = {"A": len(full["A"]) - 6, "B": len(full["B"]) - 6}
    seqs = {name: Sequence(i, name, 0, prompt_len[name], full[name][:prompt_len[name]],
                           SamplingParams(temperature=0)) for i, name in enumerate(full)}
    a, b = seqs["A"], seqs["B"]
    got = defaultdict(dict)
    try:
        steps = [[(a, prompt_len["A"]), (b, 9)], [(b, prompt_len["B"] - 9)]]
        for step in steps:
            for seq, logits in feed(model.llm, step).items():
                got[seq].update(logits)
        for _ in range(6):
            for name, seq in seqs.items():
                seq.token_ids.append(full[name][len(seq.token_ids)])
            for seq, logits in feed(model.llm, [(a, 1), (b, 1)]).items():
                got[seq].update(logits)
    finally:
        for seq in (a, b):
            model.llm.engine.blocks.free(seq)
    for name, seq in seqs.items():
        with torch.no_grad():
            expected = model.hf(torch.tensor([full[name]])).logits[0]
        assert sorted(got[seq]) == list(range(len(full[name])))
        engine = torch.stack([got[seq][p] for p in range(len(full[name]))])
        assert (engine - expected).abs().max().item() <= 1e-4, f"{arch} sequence {name}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_batched_greedy_generation_matches_transformers_generate(tiny, arch):
    model = tiny(arch)
    outputs = model.llm.generate(PROMPTS, greedy_params(), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.prompt_token_ids == model.prompt_ids(prompt)
        assert output.outputs[0].token_ids == model.greedy(prompt), f"{arch}: {prompt!r}"


def test_sharpened_tiny_models_make_varied_position_dependent_text(tiny):
    """Guards the other tests' power: constant text, or text blind to positions, would pass them anyway."""
    llama3, mistral = tiny("llama3"), tiny("mistral")  # same weights, different rotary embeddings
    for prompt in PROMPTS:
        assert len(set(llama3.greedy(prompt))) > NEW_TOKENS // 4
    assert any(llama3.greedy(p) != mistral.greedy(p) for p in PROMPTS)


# Families whose layers differ most from Llama's: sliding windows + soft-capping, routed experts, interleaved
# partial RoPE + sandwich norms, learned positions + multi-query attention.
SCHEDULING_ARCHS = ["llama", "gemma2", "mixtral", "glm4", "gpt_bigcode"]


@pytest.mark.parametrize("arch", SCHEDULING_ARCHS)
def test_requests_joining_mid_generation_get_the_tokens_they_get_alone(tiny, arch):
    model = tiny(arch)
    engine = model.llm.engine
    # (prompt, max_tokens, steps to run before the next arrival): requests finish and arrive mid-batch.
    arrivals = [(PROMPTS[0], NEW_TOKENS, 3), (PROMPTS[1], 10, 0), (PROMPTS[2], NEW_TOKENS, 5),
                (PROMPTS[3], 20, 7), (PROMPTS[1] + " B", NEW_TOKENS, 0)]
    finished = {}
    for i, (prompt, max_tokens, steps) in enumerate(arrivals):
        engine.add_request(f"join-{i}", prompt, None, greedy_params(max_tokens))
        for _ in range(steps):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    for i, (prompt, max_tokens, _) in enumerate(arrivals):
        completion = finished[f"join-{i}"].outputs[0]
        assert completion.token_ids == model.greedy(prompt)[:max_tokens]
        assert completion.finish_reason == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prompts_longer_than_the_step_budget_are_prefilled_in_chunks(tiny):
    model = tiny("llama")
    llm = LLM(str(model.path), **ENGINE_ARGS, max_num_batched_tokens=16)
    assert len(model.prompt_ids(PROMPTS[3])) > 3 * 16
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[2]]
    outputs = llm.generate(prompts, greedy_params(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [model.greedy(p) for p in prompts]


@pytest.mark.parametrize("arch", SCHEDULING_ARCHS)
def test_preempted_sequences_are_recomputed_to_the_same_tokens(tiny, arch):
    model = tiny(arch)
    # 24 blocks of 4 tokens: room for one to three of these sequences (33 to 93 tokens) at a time.
    llm = LLM(str(model.path), dtype="float32", max_model_len=96, num_kv_blocks=24, block_size=4)
    # Seeded samples too: a recompute that regenerated tokens would draw new ones, unlike greedy.
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    params = [greedy_params(), seeded] * len(PROMPTS)
    prompts = [p for p in PROMPTS for _ in range(2)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    # The reference holds every sequence's whole KV at once, so it can never preempt (the module's shared
    # engine, 64 blocks, could: these eight need more).
    needed = sum(-(-(len(model.prompt_ids(p)) + NEW_TOKENS) // 4) for p in prompts)
    assert needed > ENGINE_ARGS["num_kv_blocks"]
    reference = LLM(str(model.path), **ENGINE_ARGS | dict(num_kv_blocks=needed))
    unconstrained = reference.generate(prompts, params, use_tqdm=False)
    assert reference.engine.scheduler.num_preemptions == 0
    assert [o.outputs[0].token_ids for o in unconstrained[::2]] == [model.greedy(p) for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in unconstrained]
    assert llm.engine.blocks.num_free_blocks == 24


def test_abort_frees_kv_blocks_and_leaves_other_requests_untouched(tiny):
    model = tiny("llama")
    engine = model.llm.engine
    blocks = engine.blocks
    engine.add_request("keep", PROMPTS[2], None, greedy_params())
    engine.add_request("drop", PROMPTS[3], None, greedy_params())
    for _ in range(4):
        engine.step()
    used_by_both = blocks.num_blocks - blocks.num_free_blocks
    aborted = engine.abort_request("drop")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert len(aborted.outputs[0].token_ids) == 4  # one token from the prefill step, three from decodes
    assert 0 < blocks.num_blocks - blocks.num_free_blocks < used_by_both
    engine.add_request("never-run", PROMPTS[0], None, greedy_params())
    assert engine.abort_request("never-run").outputs[0].finish_reason == "abort"
    assert engine.abort_request("unknown") is None
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"keep"}
    assert outputs[-1].outputs[0].token_ids == model.greedy(PROMPTS[2])
    assert blocks.num_free_blocks == blocks.num_blocks


def test_unknown_architecture_is_refused_naming_the_supported_ones(tiny, tmp_path):
    folder = shutil.copytree(tiny("llama").path, tmp_path / "unknown")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture FancyNewForCausalLM") as error:
        LLM(str(folder), **ENGINE_ARGS)
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "GemmaForCausalLM", "Phi3ForCausalLM"):
        assert supported in str(error.value)


@pytest.mark.parametrize("model_type, arch", [("internlm", "InternLMForCausalLM")])
def test_remote_code_models_are_refused_naming_the_supported_ones(tmp_path, model_type, arch):
    """InternLM exists only as checkpoint code (auto_map); no transformers class. (Baichuan and ChatGLM2/3,
    checkpoint code too, are read natively: tests/test_baichuan.py, tests/test_chatglm.py.)"""
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": [arch],
        "auto_map": {"AutoConfig": f"configuration_{model_type}.Config",
                     "AutoModelForCausalLM": f"modeling_{model_type}.{arch}"}}))
    with pytest.raises(ValueError, match=f"{arch} needs the modelling code that ships with its checkpoint") as error:
        LLM(str(folder), **ENGINE_ARGS)
    assert "loraserve runs no checkpoint code" in str(error.value) and "LlamaForCausalLM" in str(error.value)
