"""Automatic prefix caching: requests that share a prompt prefix reuse its KV blocks, but only under the
same adapter, and every request's tokens are exactly those the engine gives it with the cache off."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import Sequence
from tiny_models import make_sharp_tiny_model

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never repeat the question. "
QUESTIONS = ["what is the sea?", "why do cats purr?", "name a river.", "how far is the moon?"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
ENGINE = dict(dtype="float32", max_model_len=192, block_size=8, num_kv_blocks=160)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_sharp_tiny_model("llama", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapters(model_path, tmp_path_factory) -> list[LoRARequest]:
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("adapters")
    return [LoRARequest(f"a{i}", i + 1, str(make_peft_adapter(hf, folder / f"a{i}", seed=i, r=8, lora_alpha=16,
                                                                target_modules="all-linear")))
            for i in range(2)]


@pytest.fixture(scope="module")
def engines(model_path):
    """(cache on, cache off), both able to serve the adapters."""
    lora = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
    return (LLM(str(model_path), **ENGINE, **lora),
            LLM(str(model_path), **ENGINE, **lora, enable_prefix_caching=False))


def run(llm: LLM, prompts: list[str], lora=None):
    return [o.outputs[0] for o in llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=lora)]


def hits(llm: LLM) -> int:
    return llm.engine.blocks.hit_tokens


def assert_same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for pa, pb in zip(a.logprobs, b.logprobs, strict=True):
            assert pa.keys() == pb.keys()
            for token in pa:
                assert abs(pa[token].logprob - pb[token].logprob) < 1e-4


def assert_idle(llm: LLM) -> None:
    blocks = llm.engine.blocks
    assert not llm.engine.has_unfinished_requests()
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)


@pytest.mark.parametrize("adapter", [None, 0])
def test_shared_prefix_is_reused_and_changes_no_token(engines, adapters, adapter):
    cached, plain = engines
    lora = None if adapter is None else adapters[adapter]
    prompts = [SYSTEM + q for q in QUESTIONS]
    want = run(plain, prompts, lora)
    first = run(cached, prompts[:1], lora)  # computes the system prompt's blocks and registers them
    before = hits(cached)
    rest = run(cached, prompts[1:], lora)  # each starts from them
    reused = hits(cached) - before
    block = ENGINE["block_size"]
    assert reused >= 3 * (len(SYSTEM) // block) * block
    assert_same(first + rest, want)
    assert_same(run(cached, prompts, lora), want)  # all four again, now whole prompts cached
    assert_idle(cached)


def test_no_block_is_shared_across_adapters_or_with_the_base(engines, adapters):
    cached, plain = engines
    prompt = ["No sharing here. " + SYSTEM + "which adapter am I?"]  # a prefix no other test computed
    run(cached, prompt, adapters[0])
    for lora in (adapters[1], None):
        before = hits(cached)
        got = run(cached, prompt, lora)
        assert hits(cached) == before, f"KV computed under a0 was reused for {lora}"
        assert_same(got, run(plain, prompt, lora))
    before = hits(cached)
    assert_same(run(cached, prompt, adapters[0]), run(plain, prompt, adapters[0]))
    assert hits(cached) > before  # the same adapter does reuse it


def test_adapter_identity_is_its_content_not_its_id(engines, adapters):
    """The key is the adapter's content hash: the same weights under a new id and name share the cache."""
    cached, _ = engines
    prompt = ["Twins. " + SYSTEM + "same weights, new name"]
    run(cached, prompt, adapters[0])
    before = hits(cached)
    twin = LoRARequest("twin", 77, adapters[0].lora_path)
    run(cached, prompt, twin)
    assert hits(cached) > before


def test_preemption_with_cached_prefixes_changes_no_token(model_path, adapters):
    """A KV cache too small for the batch: sequences are preempted and come back through the cache."""
    small = dict(ENGINE, num_kv_blocks=40)
    cached = LLM(str(model_path), **small, enable_lora=True, max_loras=2, max_lora_rank=8)
    plain = LLM(str(model_path), **small, enable_lora=True, max_loras=2, max_lora_rank=8,
                enable_prefix_caching=False)
    prompts = [SYSTEM + q for q in QUESTIONS * 2]
    loras = [adapters[i % 2] if i % 3 else None for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=40)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    got = [o.outputs[0].token_ids for o in cached.generate(prompts, params, use_tqdm=False, lora_request=loras)]
    assert cached.engine.scheduler.num_preemptions > 0
    assert hits(cached) > 0
    assert got == want
    assert_idle(cached)


def seq_of(tokens: list[int], seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, len(tokens), list(tokens), SamplingParams())


def compute(blocks: BlockManager, seq: Sequence) -> None:
    """What a step does to the sequence's blocks: allocate for its pending tokens, compute, register."""
    blocks.allocate(seq, seq.num_pending_tokens)
    seq.num_computed_tokens = len(seq.token_ids)
    blocks.register_computed(seq)


def test_blocks_are_shared_counted_and_evicted_least_recently_freed_first():
    blocks = BlockManager(num_blocks=6, block_size=4)
    first = seq_of(list(range(10)))  # two full blocks and a partial one
    compute(blocks, first)
    assert len(blocks.cached) == 2
    second = seq_of(list(range(9)) + [99], seq_id=1)
    assert blocks.reuse_prefix(second) == 8
    assert second.block_table == first.block_table[:2] and second.num_computed_tokens == 8
    assert [blocks.ref_counts[b] for b in second.block_table] == [2, 2]
    compute(blocks, second)
    assert blocks.num_free_blocks == 2
    blocks.free(first)
    blocks.free(second)
    assert blocks.num_free_blocks == 6 and not any(blocks.ref_counts)
    assert len(blocks.cached) == 2  # freed blocks keep their KV until handed out again
    # Six fresh blocks are handed out in LRU order: never-used ones first, then the sequences' tails,
    # and the shared prefix blocks (freed last) at the very end, each forgetting its key as it goes.
    hungry = seq_of(list(range(100, 124)), seq_id=2)
    blocks.allocate(hungry, 20)
    assert len(blocks.cached) == 1
    blocks.allocate(hungry, 24)
    assert blocks.cached == {} and blocks.key_of == {}


def test_a_prompt_is_never_entirely_reused():
    """The last prompt token is always computed, so the step has logits to sample from."""
    blocks = BlockManager(num_blocks=4, block_size=4)
    compute(blocks, seq_of(list(range(8))))
    again = seq_of(list(range(8)), seq_id=1)
    blocks.reuse_prefix(again)
    assert again.num_computed_tokens == 4 and again.num_pending_tokens == 4


def test_cli_switch_turns_the_cache_off():
    code = ("import argparse; from loraserve.cli import add_engine_arguments, engine_config; "
            "p = argparse.ArgumentParser(); add_engine_arguments(p, True); "
            "print(engine_config(p.parse_args([])).enable_prefix_caching, "
            "engine_config(p.parse_args(['--no-enable-prefix-caching'])).enable_prefix_caching)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
