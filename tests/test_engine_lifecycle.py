"""Requests and adapters through their whole life in the engine: streamed text against the final text and
the tokenizer, request limits by parameter name, adapter identity (paths, ids, content), unloading while
requests run, and what a RequestOutput carries back."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, RequestOutputKind, SamplingParams
from loraserve.errors import AdapterRemovedError, LoRAError, ParamError
from loraserve.outputs import add_delta
from test_lora_batching import assert_idle
from tiny_models import make_sharp_tiny_model, make_tiny_model

ENGINE = dict(dtype="float32", max_model_len=96, num_kv_blocks=128, block_size=4)
PROMPT = "adapter lifecycle"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_sharp_tiny_model("llama", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def hf(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(str(model_path), **ENGINE, enable_lora=True, max_loras=2, max_cpu_loras=2)


def adapter(hf, folder: Path, seed: int) -> Path:
    return make_peft_adapter(hf, folder, seed=seed, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def tokens(llm: LLM, lora: LoRARequest | None, prompt: str = PROMPT) -> list[int]:
    return llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids


def drain(llm: LLM) -> dict[str, list]:
    """Step until idle; every output of every request, in order."""
    seen: dict[str, list] = {}
    for _ in range(1000):
        if not llm.engine.has_unfinished_requests():
            return seen
        for output in llm.engine.step():
            seen.setdefault(output.request_id, []).append(output)
    raise AssertionError("the engine did not finish")


# ---- text ---------------------------------------------------------------------------------------------


def test_streamed_text_equals_final_text_equals_decode(model_path):
    """The tiny model speaks random bytes, so outputs split and end inside multi-byte characters; each
    step's text only grows, and the final text is the tokenizer's decode of the output tokens."""
    llm = LLM(str(model_path), **ENGINE)
    tokenizer = llm.get_tokenizer()
    for i in range(24):
        llm.engine.add_request(str(i), f"bytes {i}", None, SamplingParams(temperature=1.0, seed=i, max_tokens=17,
                                                                          ignore_eos=True))
    outputs = drain(llm)
    cut_inside_a_character = 0
    for steps in outputs.values():
        texts = [step.outputs[0].text for step in steps]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
        final = steps[-1].outputs[0]
        assert final.text == tokenizer.decode(final.token_ids, skip_special_tokens=True)
        cut_inside_a_character += final.text.endswith("\ufffd")
    assert cut_inside_a_character  # the flush at the end was needed at least once


def test_delta_outputs_add_up_to_the_cumulative_ones(model_path):
    """The same seeded requests (n=2, logprobs, stop strings taken from the text they produce) as CUMULATIVE,
    DELTA and FINAL_ONLY outputs: deltas add up to the cumulative final answer, field by field; every sum of
    deltas so far is a prefix of the final text (a possible stop string is held back, never sent and cut);
    FINAL_ONLY gives one output, the final one."""
    llm = LLM(str(model_path), **ENGINE)

    def run(kind: RequestOutputKind, stops: list[str] | None) -> dict[str, list]:
        for i in range(6):
            llm.engine.add_request(str(i), f"delta {i}", None, SamplingParams(
                n=2, temperature=1.0, seed=i, max_tokens=20, ignore_eos=True, logprobs=2, stop=stops,
                output_kind=kind))
        return drain(llm)

    texts = [c.text for steps in run(RequestOutputKind.CUMULATIVE, None).values() for c in steps[-1].outputs]
    stops = sorted({t[len(t) // 2:len(t) // 2 + 2] for t in texts if len(t) > 4})[:3]  # some will match
    cumulative, delta = run(RequestOutputKind.CUMULATIVE, stops), run(RequestOutputKind.DELTA, stops)
    final_only = run(RequestOutputKind.FINAL_ONLY, stops)
    stopped = 0
    for request_id, steps in cumulative.items():
        final = steps[-1]
        assert [(o.finished, o.outputs) for o in final_only[request_id]] == [(True, final.outputs)]
        total = None
        for output in delta[request_id]:
            total = add_delta(total, output)
            for c in total.outputs:
                assert final.outputs[c.index].text.startswith(c.text)
        assert total.finished and total.outputs == final.outputs
        stopped += sum(c.stop_reason in stops for c in final.outputs)
    assert stopped  # the stop strings were hit, so holding back mattered


# ---- limits, by parameter ------------------------------------------------------------------------------


@pytest.mark.parametrize("params,param", [
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(n=0), "n"), (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop")])
def test_sampling_params_name_the_bad_parameter(params, param):
    with pytest.raises(ParamError) as error:
        SamplingParams(**params)
    assert error.value.param == param and param in str(error.value)


def test_engine_limits_name_the_bad_parameter(llm):
    engine = llm.engine
    cases = [("prompt", dict(prompt_token_ids=[])), ("prompt", dict(prompt_token_ids=[1] * 200)),
             ("prompt", dict(prompt_token_ids=[10_000])), ("max_tokens", dict(max_tokens=94)),
             ("n", dict(n=17))]
    for param, case in cases:
        ids = case.pop("prompt_token_ids", [1, 2, 3])
        with pytest.raises(ParamError) as error:
            engine.make_request("x", None, ids, SamplingParams(**case))
        assert error.value.param == param, (param, str(error.value))
    assert "n=17 exceeds this engine's limit of 16" in str(error.value)
    # The largest seeds run, and seed + index wraps instead of overflowing for n > 1.
    out = llm.generate(PROMPT, SamplingParams(seed=2**63 - 1, n=2, max_tokens=3), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    assert_idle(llm)


def test_max_n_is_an_engine_option(model_path):
    llm = LLM(str(model_path), **ENGINE, max_n=2)
    with pytest.raises(ParamError, match="n=3 exceeds this engine's limit of 2"):
        llm.generate(PROMPT, SamplingParams(n=3), use_tqdm=False)
    with pytest.raises(TypeError, match=r"unknown engine option.*max_lora\b.*valid options: .*max_loras"):
        LLM(str(model_path), max_lora=2)


def test_context_length_is_decided_once_from_the_spec(tmp_path):
    """A sliding window does not limit the served context (attention honours it, tests/test_models.py checks
    the tokens past it); the model's max_position_embeddings does."""
    mistral = make_tiny_model("mistral", tmp_path / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(config | {"sliding_window": 64}))
    assert LLM(str(mistral), dtype="float32", max_model_len=256, num_kv_blocks=80).engine.max_model_len == 256
    with pytest.raises(ValueError, match="max_model_len=1024 exceeds the model's limit of 512 tokens"):
        LLM(str(mistral), dtype="float32", max_model_len=1024)
    assert LLM(str(mistral), dtype="float32", num_kv_blocks=140).engine.max_model_len == 512


def test_building_a_config_does_not_measure_the_machine():
    code = ("from loraserve.config import EngineConfig; import loraserve.engine.platform as p; "
            "EngineConfig(dtype='auto'); assert p.cpu_bf16_speedup.cache_info().misses == 0")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})


# ---- what comes back ---------------------------------------------------------------------------------


def test_outputs_carry_their_lora_request_and_metrics(llm, hf, tmp_path):
    lora = LoRARequest("routed", 31, str(adapter(hf, tmp_path / "routed", seed=31)))
    start = time.time()
    base, adapted = llm.generate([PROMPT] * 2, GREEDY, use_tqdm=False, lora_request=[None, lora])
    assert base.lora_request is None and adapted.lora_request is lora and adapted.lora_name == "routed"
    for output in (base, adapted):
        m = output.metrics
        assert start <= m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
        assert m.last_token_time <= m.finished_time <= time.time() and m.time_in_queue >= 0


def test_lora_local_path_is_a_deprecated_alias(tmp_path):
    with pytest.warns(DeprecationWarning, match="lora_local_path"):
        old = LoRARequest(lora_name="x", lora_int_id=1, lora_local_path=str(tmp_path))
    assert old == LoRARequest("x", 1, str(tmp_path)) and old.lora_path == str(tmp_path)
    assert hash(old) == hash(LoRARequest("x", 1, str(tmp_path)))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="disagree"):
        warnings.simplefilter("ignore")
        LoRARequest("x", 1, lora_path="/a", lora_local_path="/b")


# ---- adapter identity ----------------------------------------------------------------------------------


def test_one_folder_spelled_three_ways_is_one_adapter(llm, hf, tmp_path, monkeypatch):
    folder = adapter(hf, tmp_path / "spelled", seed=40)
    monkeypatch.chdir(tmp_path)
    spellings = ["spelled", f"{folder}/", str(folder)]
    results = [tokens(llm, LoRARequest("spelled", 40, path)) for path in spellings]
    assert results[0] == results[1] == results[2] != tokens(llm, None)
    assert_idle(llm)


def test_changed_files_under_a_bound_id_are_refused_not_served(llm, hf, tmp_path):
    """An id means the content first loaded under it: after an eviction the changed files are refused
    (never served in the old weights' place); removing and adding the id again takes the new files."""
    folder = tmp_path / "changing"
    first = LoRARequest("changing", 50, str(adapter(hf, folder, seed=50)))
    old = tokens(llm, first)
    shutil.rmtree(folder)
    adapter(hf, folder, seed=51)
    new_reference = tokens(llm, LoRARequest("fresh", 51, str(folder)))
    assert tokens(llm, first) == old  # still cached: the content it was loaded with
    for i, seed in enumerate((52, 53)):  # evict it (two host copies)
        tokens(llm, LoRARequest(f"other{i}", 60 + i, str(adapter(hf, tmp_path / f"other{i}", seed=seed))))
    assert 50 not in llm.engine.lora_manager.host.cached_ids()
    with pytest.raises(LoRAError, match=re.escape(f"the files of adapter 'changing' in {str(folder)!r} changed "
                                                  f"since it was loaded as lora_int_id 50")):
        tokens(llm, first)
    assert llm.remove_lora(50)
    llm.add_lora(first)
    assert tokens(llm, first) == new_reference != old
    assert_idle(llm)


def test_unload_while_running_finishes_on_the_old_weights(llm, hf, tmp_path):
    """remove_lora while a request runs: it finishes with the weights it started with although the folder
    is gone; new requests are refused; then its host copy and slot are freed."""
    lora = LoRARequest("leaving", 70, str(adapter(hf, tmp_path / "leaving", seed=70)))
    expected = tokens(llm, lora)
    engine, manager = llm.engine, llm.engine.lora_manager
    engine.add_request("running", PROMPT, None, GREEDY, lora)
    content = engine.requests["running"].held[0].content_hash
    engine.step()
    engine.step()
    assert content in manager.slots.owner
    assert llm.remove_lora(70) and 70 not in llm.list_loras()
    shutil.rmtree(lora.lora_path)
    with pytest.raises(AdapterRemovedError, match="'leaving' \\(lora_int_id 70\\) was removed"):
        engine.make_request("late", PROMPT, None, GREEDY, lora)
    outputs = drain(llm)
    assert outputs["running"][-1].outputs[0].token_ids == expected
    stats = manager.stats()  # on the step thread: frees the slots of removed adapters nobody holds
    assert 70 not in manager.host.cached_ids() and content not in manager.slots.owner
    assert stats.slots_used == sum(owner is not None for owner in manager.slots.owner)
    assert_idle(llm)
    llm.add_lora(lora_request=LoRARequest("back", 71, str(adapter(hf, tmp_path / "back", seed=70))))
    assert tokens(llm, LoRARequest("back", 71, str(tmp_path / "back"))) == expected  # same weights, new id


def test_concurrent_cold_loads_of_one_id_read_it_once(llm, hf, tmp_path):
    """Two threads take the same cold adapter at once: one disk read, two uses (a load and a hit)."""
    import threading

    lora = LoRARequest("shared", 80, str(adapter(hf, tmp_path / "shared", seed=80)))
    manager = llm.engine.lora_manager
    before = manager.stats().host
    taken, barrier = [], threading.Barrier(2)

    def take() -> None:
        barrier.wait()
        taken.append(manager.acquire(lora))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = manager.stats().host
    assert taken[0] is taken[1]
    assert (after.loads - before.loads, after.hits - before.hits) == (1, 1)
    for a in taken:
        manager.release(a)


def test_cold_loads_between_steps_serve_the_same_and_fail_the_same(model_path, llm, hf, tmp_path):
    """Where the compute threads fill every core, the async engine parses a cold adapter on its step thread,
    between steps: the adapter serves what the offline engine serves, a broken one fails with its reason, a
    resident stream runs on meanwhile, and after shutdown the work runs in the caller (nothing waits)."""
    import asyncio
    import threading

    from loraserve.config import EngineConfig
    from loraserve.engine.async_engine import AsyncLLMEngine
    from loraserve.engine.engine import LLMEngine

    good = LoRARequest("good", 90, str(adapter(hf, tmp_path / "good", seed=90)))
    resident = LoRARequest("resident", 91, str(adapter(hf, tmp_path / "resident", seed=91)))
    broken = tmp_path / "broken"
    shutil.copytree(good.lora_path, broken)
    (broken / "adapter_config.json").write_text("{not json")
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_options(model=str(model_path), **ENGINE, enable_lora=True,
                                                                max_loras=2, max_cpu_loras=2)), True)
    manager = engine._engine.lora_manager
    try:
        assert manager.run_cpu_work(threading.current_thread).name == "loraserve-engine"

        async def run(lora: LoRARequest, request_id: str, max_tokens: int = 12) -> list[int]:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            outputs = [output async for output in engine.generate(request_id, PROMPT, None, params, lora)]
            return outputs[-1].outputs[0].token_ids

        async def together():
            long = asyncio.create_task(run(resident, "long", 40))
            await asyncio.sleep(0.05)
            cold = await run(good, "cold")
            with pytest.raises(LoRAError, match="not valid JSON"):
                await run(LoRARequest("broken", 92, str(broken)), "broken")
            return await long, cold

        long, cold = asyncio.run(together())
    finally:
        engine.shutdown()
    assert cold == tokens(llm, good)
    assert long == llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False,
                                lora_request=resident)[0].outputs[0].token_ids
    assert manager.run_cpu_work(threading.current_thread) is threading.current_thread()


def test_spare_cores_counts_the_compute_threads():
    from loraserve.engine.platform import spare_cores

    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not spare_cores("cpu")
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert spare_cores("cpu")
        assert spare_cores("cuda:0")
    finally:
        torch.set_num_threads(threads)
