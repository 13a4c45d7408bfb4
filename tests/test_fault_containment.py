"""Fault containment: a step that raises for one request, or gives one adapter's requests non-finite logits,
fails those requests alone; every other request in the same batches gets exactly the tokens it gets without
the fault. A fault outside the step's computation (the scheduler) stays fatal for the async engine."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.engine.sequence import Sequence
from loraserve.errors import EngineDeadError, RequestFailedError
from loraserve.outputs import RequestOutput
from test_lora_batching import assert_idle
from tiny_models import make_sharp_tiny_model

# a small step budget: long prompts are prefilled in chunks, beside other requests' decodes
ENGINE = dict(dtype="float32", max_model_len=96, num_kv_blocks=128, block_size=4, max_num_batched_tokens=24,
              enable_lora=True, max_loras=3, max_cpu_loras=4)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=10, ignore_eos=True)
SHORT = "fault containment"
LONG = "a prompt long enough that its prefill takes several chunks of the step's token budget"

Row = tuple[list[int], SamplingParams, LoRARequest | None]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_sharp_tiny_model("llama", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def hf(model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(str(model_path), **ENGINE)


def adapter(hf, folder: Path, name: str, lora_id: int) -> LoRARequest:
    path = make_peft_adapter(hf, folder / name, seed=lora_id, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return LoRARequest(name, lora_id, str(path))


@pytest.fixture(scope="module")
def adapters(hf, tmp_path_factory) -> tuple[LoRARequest, LoRARequest]:
    folder = tmp_path_factory.mktemp("adapters")
    return adapter(hf, folder, "a", 1), adapter(hf, folder, "b", 2)


def healthy_rows(llm: LLM, adapters) -> list[Row]:
    """Base and adapter requests, greedy and seeded (n=2), short and long prompts."""
    a, b = adapters
    encode = llm.get_tokenizer().encode
    return [(encode(SHORT), GREEDY, None), (encode(LONG), GREEDY, a), (encode(SHORT), SEEDED, a),
            (encode(LONG), SEEDED, None), (encode("another " + SHORT), GREEDY, b)]


def offline(llm: LLM, rows: list[Row]) -> list[RequestOutput]:
    token_ids, params, loras = zip(*rows, strict=True)
    return llm.generate([{"prompt_token_ids": t} for t in token_ids], list(params), use_tqdm=False,
                        lora_request=list(loras))


def served(llm: LLM, rows: list[Row]) -> list[RequestOutput | BaseException]:
    """The rows through an AsyncLLMEngine over the same engine, all at once: each one's final output, or what
    its stream raised."""
    engine = AsyncLLMEngine(llm.engine, cold_loads_between_steps=False)

    async def one(index: int, row: Row) -> RequestOutput | BaseException:
        token_ids, params, lora = row
        try:
            return [output async for output in engine.generate(f"served-{index}", None, token_ids, params, lora)][-1]
        except RequestFailedError as exc:
            return exc

    async def together():
        return await asyncio.gather(*(one(i, row) for i, row in enumerate(rows)))

    try:
        return asyncio.run(together())
    finally:
        engine.shutdown()
        assert engine.stopped.is_set()


def completions(output: RequestOutput) -> list[list[int]]:
    return [c.token_ids for c in output.outputs]


def assert_failed(outcome: RequestOutput | BaseException, reason: str) -> None:
    """Failed alone, saying why: a RequestFailedError from the stream, or a final output with `error` set and
    its samples ended with finish_reason "error"."""
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, RequestFailedError) and outcome.reason == reason
        return
    assert outcome.finished and outcome.error == str(RequestFailedError(reason))  # no exception text
    assert all((c.finish_reason, c.stop_reason) == ("error", reason) for c in outcome.outputs)


def assert_nothing_held(llm: LLM) -> None:
    assert_idle(llm)  # every KV block free
    assert not llm.engine.lora_manager.host._pins  # no adapter pinned by a request


@pytest.mark.parametrize("run", [offline, served])
def test_a_step_that_raises_for_one_request_fails_it_alone(llm, adapters, monkeypatch, run):
    """The model raises whenever the trigger token (in one long prompt only) is in the batch: the step that
    holds it fails, each of its requests is computed again alone, and only the trigger's request fails."""
    rows = healthy_rows(llm, adapters)
    expected = [completions(output) for output in offline(llm, rows)]
    used = {t for token_ids, _, _ in rows for t in token_ids} | {t for e in expected for c in e for t in c}
    trigger = next(t for t in range(3, llm.engine.model.spec.vocab_size) if t not in used)
    victim = llm.get_tokenizer().encode(LONG)
    victim[30:30] = [trigger]  # in the prompt's second chunk: other requests decode meanwhile
    layer = llm.engine.model.model.layers[1]  # after layer 0 wrote its KV: the retry writes it again
    forward = layer.forward
    failed_steps: list[int] = []

    def faulty(x, residual, rotary, batch):
        if bool((batch.input_ids == trigger).any()):
            failed_steps.append(batch.input_ids.numel())
            raise RuntimeError("injected fault")
        return forward(x, residual, rotary, batch)

    monkeypatch.setattr(layer, "forward", faulty)
    outcomes = run(llm, [*rows[:2], (victim, GREEDY, adapters[0]), *rows[2:]])

    assert len(failed_steps) == 2 and failed_steps[0] > failed_steps[1]  # in a batch, then alone
    assert_failed(outcomes.pop(2), "step_error")
    assert [completions(output) for output in outcomes] == expected
    assert_nothing_held(llm)


def test_a_step_that_fails_after_sampling_is_computed_again_exactly(llm, adapters, monkeypatch):
    """The sampler raises once, after the seeded rows drew their noise: no request fails, and the seeded ones
    draw the same tokens when computed again (their generators were put back)."""
    rows = healthy_rows(llm, adapters)
    expected = [completions(output) for output in offline(llm, rows)]
    sampler = llm.engine.runner.sampler
    failures: list[int] = []

    def flaky(logits, batch):
        output = sampler(logits, batch)
        if batch.seeded and not failures:
            failures.append(len(batch.seeded))
            raise RuntimeError("injected fault")
        return output

    monkeypatch.setattr(llm.engine.runner, "sampler", flaky)
    outputs = offline(llm, rows)
    assert failures and all(output.error is None for output in outputs)
    assert [completions(output) for output in outputs] == expected
    assert_nothing_held(llm)


@pytest.mark.parametrize("run", [offline, served])
def test_nonfinite_adapter_fails_its_requests_alone(llm, adapters, hf, tmp_path, run):
    """A NaN in one adapter's host copy, after it was loaded: its requests fail with nonfinite_logits, the base
    and the other adapters' requests in the same batches are untouched; the KV its long prompt's first chunks
    registered in the prefix cache is gone, so the repaired adapter serves that prompt again."""
    rows = healthy_rows(llm, adapters)
    expected = [completions(output) for output in offline(llm, rows)]
    broken = adapter(hf, tmp_path, "broken", 10 + [offline, served].index(run))  # new content: in no slot yet
    loaded = llm.engine.add_lora(broken)
    factors = next(iter(loaded.modules.values())).lora_b
    weight = factors[0, 0].item()
    factors[0, 0] = float("nan")
    blocks = llm.engine.blocks
    register = blocks.register_computed
    registered: set[bytes] = set()  # prefix keys of the broken adapter's blocks

    def spy(seq) -> None:
        register(seq)
        if seq.lora is not None and loaded in seq.lora.adapters:
            registered.update(seq.block_keys)

    encode = llm.get_tokenizer().encode
    broken_rows = [(encode("its own " + LONG[:60]), GREEDY, broken), (encode(SHORT), SEEDED, broken)]
    blocks.register_computed = spy
    try:
        outcomes = run(llm, [rows[0], broken_rows[0], *rows[1:4], broken_rows[1], rows[4]])
    finally:
        del blocks.register_computed

    assert_failed(outcomes.pop(5), "nonfinite_logits")
    assert_failed(outcomes.pop(1), "nonfinite_logits")
    assert [completions(output) for output in outcomes] == expected
    assert registered and not registered & blocks.cached.keys()
    assert_nothing_held(llm)
    factors[0, 0] = weight
    llm.engine.lora_manager.slots.free([loaded.content_hash])  # refilled from the repaired copy at its next use
    assert offline(llm, broken_rows[:1])[0].error is None
    assert_nothing_held(llm)


def test_nonfinite_kv_reaches_no_other_request(tmp_path):
    """Where decode attention runs in PyTorch (a sliding window here) it reads the unwritten end of a last block
    and masks it, but a masked NaN still spoils the sum (0 * NaN): a failed request's KV must reach no request
    that gets its blocks later (here: the others of its batch, then a batch after it)."""
    path = make_sharp_tiny_model("mistral_window", tmp_path / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    broken = adapter(hf, tmp_path, "broken", 1)
    llm = LLM(str(path), **ENGINE, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [f"request {i}" + " and more" * i for i in range(6)]
    expected = [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)]
    next(iter(llm.engine.add_lora(broken).modules.values())).lora_b[0, 0] = float("nan")

    outputs = llm.generate([LONG[:50], *prompts], params, use_tqdm=False, lora_request=[broken] + [None] * 6)

    assert_failed(outputs[0], "nonfinite_logits")
    assert [output.outputs[0].token_ids for output in outputs[1:]] == expected
    assert [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)] == expected
    assert_nothing_held(llm)


def test_decode_block_tables_are_padded_with_each_sequences_own_block(llm):
    """The PyTorch decode path reads the padding and masks it: it must never be another sequence's KV, which may
    be NaN in the very step that fails that sequence."""
    short = Sequence(0, "short", 0, 3, [5, 6, 7, 8], GREEDY, block_table=[5], num_computed_tokens=3)
    long = Sequence(1, "long", 0, 9, list(range(3, 13)), GREEDY, block_table=[7, 8, 9], num_computed_tokens=9)
    batch, _ = llm.engine.runner.build_batch([ScheduledSeq(short, 1), ScheduledSeq(long, 1)], {})
    assert batch.attention.decode_block_tables.tolist() == [[5, 5, 5], [7, 8, 9]]


def test_a_failing_scheduler_stops_the_async_engine(llm, monkeypatch):
    """A fault outside a step's computation is fatal: open streams and later requests get EngineDeadError,
    the engine reports unhealthy, and `stopped` is set for the server to exit on."""
    engine = AsyncLLMEngine(llm.engine, cold_loads_between_steps=False)
    schedule = llm.engine.scheduler.schedule
    calls = 0

    def failing():
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("injected scheduler fault")
        return schedule()

    monkeypatch.setattr(llm.engine.scheduler, "schedule", failing)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def stream(request_id: str) -> int:
        received = 0
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(request_id, SHORT, None, params):
                received += 1
        return received

    async def scenario() -> list[int]:
        received = await asyncio.gather(stream("first"), stream("second"))
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("late", SHORT, None, params))
        return received

    try:
        assert engine.healthy and not engine.stopped.is_set()
        received = asyncio.run(scenario())
        assert engine.stopped.wait(5)
        assert not engine.healthy and isinstance(engine.error, RuntimeError)
        assert sum(received) > 0  # the streams were open, producing, when the engine died
    finally:
        engine.shutdown()
    monkeypatch.undo()
    assert_nothing_held(llm)
