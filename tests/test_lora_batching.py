"""Many adapters through few slots: whatever else shares the batch, and however often slots and the host
cache are swapped, every request gets exactly the tokens it gets when it runs alone."""
from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.lora.adapter import LoRAError
from tiny_models import make_sharp_tiny_model

PROMPTS = ["hello adapters", "a somewhat longer prompt, so prefill lengths differ"]
GREEDY = SamplingParams(temperature=0, max_tokens=10)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=10)  # per-request generator: batch-independent
TARGETS = [["q_proj", "v_proj"], "all-linear", ["gate_proj", "up_proj", "down_proj"]]
ENGINE = dict(dtype="float32", max_model_len=96, block_size=4)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """Sharp weights: at init scale every adapter emits the same tokens, so a request served with another
    adapter's weights would go unnoticed."""
    return make_sharp_tiny_model("mistral", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapters(model_path, tmp_path_factory) -> list[LoRARequest]:
    """12 adapters of ranks 4/8/16 on varying targets."""
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("adapters")
    requests = []
    for i in range(12):
        rank = (4, 8, 16)[i % 3]
        path = make_peft_adapter(hf, folder / f"a{i}", seed=i, r=rank, lora_alpha=2 * rank,
                                 target_modules=TARGETS[i // 3 % 3])
        requests.append(LoRARequest(f"a{i}", i + 1, str(path)))
    return requests


def alone(llm: LLM, prompt: str, params: SamplingParams, lora: LoRARequest | None) -> list[int]:
    return llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids


def assert_idle(llm: LLM) -> None:
    """Nothing queued, running or holding KV blocks."""
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def three_slots(model_path) -> LLM:
    return LLM(str(model_path), **ENGINE, num_kv_blocks=128, enable_lora=True, max_loras=3, max_lora_rank=16)


def test_mixed_batch_of_base_and_eight_adapters_matches_each_alone(three_slots, adapters):
    llm = three_slots
    rows = [(prompt, params, lora) for lora in [None, *adapters[:8]] for prompt in PROMPTS
            for params in (GREEDY, SEEDED)]
    expected = [alone(llm, *row) for row in rows]
    assert len({tuple(tokens) for tokens in expected}) == len(rows)  # a row served wrongly would show
    before = llm.engine.lora_manager.stats()

    prompts, params, loras = zip(*rows, strict=True)
    outputs = llm.generate(list(prompts), list(params), use_tqdm=False, lora_request=list(loras))

    assert [out.outputs[0].token_ids for out in outputs] == expected
    assert [out.lora_name for out in outputs] == [lora.lora_name if lora else None for lora in loras]
    assert llm.engine.lora_manager.stats().slots.evictions > before.slots.evictions  # slots swapped mid-run
    assert_idle(llm)


def test_lora_request_list_is_parallel_to_prompts(three_slots, adapters):
    llm = three_slots
    loras = [None, adapters[0], adapters[5]]
    outputs = llm.generate([PROMPTS[0]] * 3, GREEDY, use_tqdm=False, lora_request=loras)
    assert [out.lora_name for out in outputs] == [None, "a0", "a5"]
    assert [out.outputs[0].token_ids for out in outputs] == [alone(llm, PROMPTS[0], GREEDY, lora) for lora in loras]
    with pytest.raises(ValueError, match="lora_request has 2 entries for 3 prompts; give one, or one per prompt"):
        llm.generate([PROMPTS[0]] * 3, GREEDY, use_tqdm=False, lora_request=loras[:2])
    assert_idle(llm)


def test_same_lora_int_id_for_another_adapter_is_refused(three_slots, adapters):
    llm = three_slots
    expected = alone(llm, PROMPTS[0], GREEDY, adapters[0])
    impostor = LoRARequest("impostor", adapters[0].lora_int_id, adapters[1].lora_path)
    message = (f"lora_int_id 1 already names adapter 'a0' at {adapters[0].lora_path!r}; "
               f"give 'impostor' ({adapters[1].lora_path!r}) an id of its own")
    with pytest.raises(LoRAError, match=re.escape(message)):
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False, lora_request=impostor)
    assert alone(llm, PROMPTS[0], GREEDY, adapters[0]) == expected
    assert_idle(llm)


def test_lora_request_without_enable_lora_says_how_to_enable_it(model_path, adapters, three_slots):
    llm = LLM(str(model_path), **ENGINE, num_kv_blocks=32)
    message = "adapter 'a0' requested but LoRA is not enabled; start the engine with enable_lora=True " \
              "(server: --enable-lora)"
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=[None, adapters[0]])
    assert_idle(llm)
    assert alone(llm, PROMPTS[0], GREEDY, None) == alone(three_slots, PROMPTS[0], GREEDY, None)


def test_churn_of_200_requests_over_12_adapters_two_slots_four_host_copies(model_path, adapters):
    """Requests arrive a few per step in random order; slots, host copies and (with a small KV cache)
    preempted sequences all churn, and nothing may change any request's tokens or leak afterwards."""
    llm = LLM(str(model_path), **ENGINE, num_kv_blocks=40, enable_lora=True, max_loras=2, max_cpu_loras=4,
              max_lora_rank=16)
    short_greedy = dataclasses.replace(GREEDY, max_tokens=4)
    short_seeded = dataclasses.replace(SEEDED, max_tokens=4)
    variants = [(prompt, params, lora) for lora in [None, *adapters] for prompt in PROMPTS
                for params in (short_greedy, short_seeded)]
    expected = {i: alone(llm, *variant) for i, variant in enumerate(variants)}
    rng = random.Random(0)
    picks = [*range(len(variants)), *(rng.randrange(len(variants)) for _ in range(200 - len(variants)))]
    rng.shuffle(picks)  # every variant at least once, in random order
    engine, manager = llm.engine, llm.engine.lora_manager
    before = manager.stats()
    preemptions_before = engine.scheduler.num_preemptions

    finished = {}
    arrivals = list(enumerate(picks))
    for _ in range(5000):
        if not arrivals and not engine.has_unfinished_requests():
            break
        count = rng.randint(0, 4)
        for request_id, variant in arrivals[:count]:
            prompt, params, lora = variants[variant]
            engine.add_request(f"churn-{request_id}", prompt, None, params, lora)
        del arrivals[:count]
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert finished == {f"churn-{i}": expected[variant] for i, variant in enumerate(picks)}

    stats = manager.stats()
    assert stats.slots.loads - before.slots.loads >= 12
    assert stats.slots.evictions > before.slots.evictions
    assert stats.host.evictions > before.host.evictions
    assert engine.scheduler.num_preemptions > preemptions_before
    assert stats.slots.loads - stats.slots.evictions == stats.slots_used <= 2
    assert stats.host.loads - stats.host.evictions == len(manager.host.cached_ids()) == stats.host.cached <= 4
    assert_idle(llm)


def test_adapter_waiting_for_the_only_slot_is_not_starved(model_path, adapters):
    """max_loras=1 and a request for adapter A arrives every step: the one request for B still runs."""
    llm = LLM(str(model_path), **ENGINE, num_kv_blocks=64, enable_lora=True, max_loras=1, max_lora_rank=16)
    a, b = adapters[0], adapters[1]
    expected = alone(llm, PROMPTS[1], GREEDY, b)
    engine = llm.engine
    stream = dataclasses.replace(GREEDY, max_tokens=4)
    engine.add_request("a-0", PROMPTS[0], None, stream, a)
    engine.step()
    engine.add_request("b", PROMPTS[1], None, GREEDY, b)
    for step in range(1, 200):
        engine.add_request(f"a-{step}", PROMPTS[0], None, stream, a)
        done = {out.request_id: out for out in engine.step() if out.finished}
        if "b" in done:
            break
    else:
        pytest.fail("the request for adapter b never ran while adapter a's stream kept the only slot busy")
    assert done["b"].outputs[0].token_ids == expected
    assert any(request_id.startswith("a-") for request_id in engine.requests)  # a's stream was still going
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    assert_idle(llm)
