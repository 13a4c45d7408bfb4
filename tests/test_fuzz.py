"""Fuzzing the OpenAI-compatible API from its own OpenAPI schema (schemathesis over hypothesis): thousands of
generated requests, valid and invalid, to every endpoint of the real app over a real AsyncLLMEngine, sent up
to four at a time. None may answer 5xx (nor a 200 stream that carries a server error), none may hang, every
4xx is in OpenAI's error shape; afterwards the server is healthy and holds nothing for the requests that are
gone: every KV block free, nothing running or waiting, no adapter pinned, no slot holding a removed adapter,
no admission ticket open.

Most generated bodies are steered towards what the server knows (its model names, real adapter folders and
paths it must refuse, sampling values in range and at the edges of float32 and int64), so that generation,
mixes, streams (cut after 20 events by schemathesis: a client going away), loads and unloads run, not only the
refusals of out-of-range values. Derandomized: the same requests on every run."""
from __future__ import annotations

import asyncio
import gc
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.engine import LLMEngine
from loraserve.server.adapters import LoRAModule
from loraserve.server.api import ServerSettings, build_app
from loraserve.server.policy import Limits
from loraserve.server.serving import OpenAIServing
from server_utils import BASE, KEY, make_server_files

ENDPOINTS = {("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"), ("GET", "/v1/models"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
             ("POST", "/v1/unload_lora_adapter")}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
WEIGHTS = {COMPLETIONS: 3, CHAT: 3, LOAD: 2}  # how often each POST is drawn (others once), per generation mode
# Cheap generation whatever is asked: a short context, few samples, few prompts per request.
OPTIONS = dict(dtype="float32", max_model_len=64, num_kv_blocks=48, block_size=4, max_n=2, enable_lora=True,
               max_loras=2, max_cpu_loras=3)
LIMITS = Limits(max_prompts=4)
VOCAB = 272  # the tiny model's
EXAMPLES = 1500  # hypothesis examples, each a batch of 1-4 requests sent at once
MIN_REQUESTS = 2000
CALL_TIMEOUT_S = 30  # a request unanswered by then is a hang
START_UP = ("a0", "a1", "a2")
# Hypothesis draws the first entry of a list, the smallest integer and False far more often than the rest:
# below, the common case comes first, and a draw of 0 (or False) means "steer".
# Adapter names: served at start, loadable at run time, never served, and the base model's.
NAMES = ["a0", "rt0", "a1", "a2", "rt1", "a3", BASE, "missing"]
MODELS = [BASE, *NAMES]
ODD = [math.nan, math.inf]  # Python's json (the server's, and many clients') reads and writes NaN and Infinity


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_server_files(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def app(files):
    config = EngineConfig.from_options(model=files["model"], **OPTIONS)
    engine = AsyncLLMEngine(LLMEngine(config), cold_loads_between_steps=True)
    modules = [LoRAModule(name, files["adapters"][name]) for name in START_UP]
    app = build_app(engine, ServerSettings([BASE], modules, api_key=KEY, allow_runtime_lora_updating=True,
                                           lora_roots=(str(files["root"]),), limits=LIMITS))
    app.state.engine = engine
    yield app
    engine.shutdown()


def lora_paths(files) -> st.SearchStrategy[str]:
    """Adapter folders half the time, else paths to refuse: too large a rank, a base model's folder, a missing
    folder, a file, a name too long for the file system, a NUL byte, outside the root, a way out of the root, a
    relative path."""
    root = files["root"]
    refused = [files["rank32"], files["model"], str(root / "nowhere"), str(root / "a0" / "adapter_config.json"),
               str(root / ("a" * 300)), f"{root}/a0\x00", "/tmp", f"{root}/../{root.name}/a1/../../..", "a0"]
    return st.one_of(st.sampled_from(list(files["adapters"].values())), st.sampled_from(refused))


def _fields() -> dict[str, st.SearchStrategy]:
    """Per field of a generation request: values the server takes, and values at the edges that it must either
    take or refuse with a 400 (float32 underflow and overflow, NaN, int64 overflow, ids outside the vocabulary,
    lone surrogates)."""
    floats = st.floats
    text = st.one_of(st.text(max_size=12), st.text(max_size=6).map(lambda t: t + "\ud800"))
    token = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([-1, -VOCAB - 1, VOCAB, 2**63, -(2**63) - 1]))
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool"]),
                                     "content": st.one_of(text, st.none(), st.lists(part, max_size=2))})
    return {
        "n": st.integers(1, 3),
        "temperature": st.one_of(floats(0, 2), st.sampled_from([0.0, 1e-30, 1e-300, 1e30, 1e308, *ODD])),
        "top_p": st.one_of(floats(1e-6, 1), st.sampled_from([1.0, 5e-324, math.nan])),
        "top_k": st.one_of(st.integers(-1, VOCAB + 1), st.just(2**63)),
        "min_p": st.one_of(floats(0, 1), st.just(math.nan)),
        "presence_penalty": floats(-2, 2),
        "frequency_penalty": floats(-2, 2),
        "repetition_penalty": st.one_of(floats(0.01, 10), st.sampled_from([1e-300, 1e300, *ODD])),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "min_tokens": st.integers(0, 8),
        "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(text, max_size=3)),
        "stop_token_ids": st.lists(token, max_size=3),
        "lora_scale": st.one_of(floats(0, 3), st.sampled_from(ODD)),
        "adapters": st.lists(st.fixed_dictionaries({"name": st.sampled_from(NAMES),
                                                    "weight": st.one_of(floats(0, 2), st.sampled_from(ODD))}),
                             min_size=1, max_size=3),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "prompt": st.one_of(st.text(min_size=1, max_size=12), st.lists(token, min_size=1, max_size=16),
                            st.lists(text, min_size=1, max_size=5),
                            st.lists(st.lists(token, min_size=1, max_size=8), min_size=1, max_size=5)),
        "messages": st.lists(message, min_size=1, max_size=3),
        "top_logprobs": st.integers(0, 21),
        "user": st.one_of(st.none(), text),
        **dict.fromkeys(("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"), st.booleans()),
    }


FIELDS = _fields()
KEPT = {"model", "max_tokens", "max_completion_tokens"}


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def steer(draw, case, paths: st.SearchStrategy[str]) -> None:
    """Most of the time replace generated values, in place, with ones the server knows: its model and adapter
    names, real adapter folders and paths to refuse, and (3 times in 4) a body of FIELDS' values, so that
    generation, mixes, streams, loads and unloads run, not only the refusals of out-of-range values."""
    body = case.body
    if not isinstance(body, dict) or draw(st.integers(0, 9)) == 9:  # some left as generated
        return
    name = st.sampled_from(NAMES)
    if case.path in (COMPLETIONS, CHAT):
        chat = case.path == CHAT
        body["model"] = draw(st.sampled_from(MODELS))
        for entry in body["adapters"] if isinstance(body.get("adapters"), list) else []:
            if isinstance(entry, dict) and not draw(st.booleans()):
                entry["name"] = draw(name)
        if draw(st.integers(0, 3)) < 3:
            for field in [field for field in body if field not in FIELDS and field not in KEPT]:
                del body[field]
            for field, values in FIELDS.items():
                if field in body or draw(st.integers(0, 5)) == 5:
                    body[field] = draw(values)
            body.pop("prompt" if chat else "messages", None)
            body["logprobs"] = draw(st.booleans() if chat else st.one_of(st.none(), st.integers(0, 21)))
            if not chat or not body["logprobs"]:
                body.pop("top_logprobs", None)
            if not body.get("stream"):
                body.pop("stream_options", None)
            if "adapters" in body or body["model"] == BASE:
                body.pop("lora_scale", None)
            if chat and "max_tokens" in body:
                body.pop("max_completion_tokens", None)
        if not draw(st.booleans()):  # few tokens: generated values are mostly refused, or fill the context
            field, other = ("max_completion_tokens", "max_tokens") if chat and draw(st.booleans()) else \
                ("max_tokens", "max_completion_tokens")
            body[field] = draw(st.integers(1, 8))
            body.pop(other, None)
        if not _finite(body):  # NaN and Infinity as Python's json writes them (requests' json= refuses them)
            case.body = json.dumps(body).encode()
    elif case.path == LOAD:
        if draw(st.integers(0, 4)) < 4:
            body["lora_name"] = draw(name)
        if draw(st.integers(0, 4)) < 4:
            body["lora_path"] = draw(paths)
    elif case.path == UNLOAD and draw(st.integers(0, 4)) < 4:
        body["lora_name"] = draw(name)


def check_answer(case, headers: dict, response) -> None:
    """No server error, whatever was sent: a 4xx in OpenAI's error shape, a 200 stream without an error event."""
    case.validate_response(response, checks=[not_a_server_error], headers=headers)
    status = response.status_code
    text = f"{case.as_curl_command(headers=headers)}\n-> {status}: {response.text}"
    assert status < 500, text
    if 400 <= status < 500:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, text
        assert isinstance(error["message"], str) and error["message"], text
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event or event["error"]["type"] != "server_error", text
    elif case.path in (COMPLETIONS, CHAT):
        assert response.json()["choices"], text


def serving_of(engine) -> OpenAIServing:
    """The app's request handler (its admission counts what is in flight), found among the live objects."""
    [serving] = [o for o in gc.get_objects() if type(o) is OpenAIServing and o.engine is engine]
    return serving


def test_fuzzed_requests_never_fail_the_server_nor_leak(app, files):
    # reproducers show every field as sent (by default "max_tokens", say, reads "[Filtered]": it holds "token")
    config = SchemathesisConfig.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = {(op.method.upper(), op.path): op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(operations) == ENDPOINTS
    strategies = []
    for (method, path), op in sorted(operations.items()):
        if method == "GET":  # nothing to vary but the key
            strategies.append(op.as_strategy())
        else:
            strategies += [op.as_strategy(generation_mode=mode) for mode in GenerationMode
                           for _ in range(WEIGHTS.get(path, 1))]
    one_case = st.one_of(strategies)
    paths = lora_paths(files)
    authorization = st.sampled_from([f"Bearer {KEY}"] * 28 + [None, "Bearer wrong", f"Basic {KEY}", KEY, ""])
    answers: dict[tuple[str, int], int] = {}

    @st.composite
    def batches(draw):
        batch = []
        for case in draw(st.lists(one_case, min_size=1, max_size=4)):
            steer(draw, case, paths)
            batch.append((case, draw(authorization)))
        return batch

    def send(case, key: str | None) -> int:
        headers = {} if key is None else {"Authorization": key}
        response = case.call(headers=headers, timeout=CALL_TIMEOUT_S)
        check_answer(case, headers, response)
        return response.status_code

    pool = ThreadPoolExecutor(4)

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(batches())
    def fuzz(batch):
        for (case, _), status in zip(batch, pool.map(lambda item: send(*item), batch), strict=True):
            answers[case.path, status] = answers.get((case.path, status), 0) + 1

    start = time.monotonic()
    try:
        fuzz()
    finally:
        pool.shutdown()
    total = sum(answers.values())
    print(f"\n{total} fuzzed requests in {time.monotonic() - start:.1f} s; (path, status): count "
          f"{dict(sorted(answers.items()))}")
    assert total >= MIN_REQUESTS
    assert {path for path, _ in answers} == {path for _, path in ENDPOINTS}
    # the steering reaches generation, loading and unloading, not only refusals
    assert answers.get((COMPLETIONS, 200), 0) + answers.get((CHAT, 200), 0) >= 200, answers
    assert answers.get((LOAD, 200), 0) >= 20 and answers.get((UNLOAD, 200), 0) >= 10, answers

    # afterwards: healthy and serving, and everything the requests held given back
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert http.get("/health").status_code == 200
        answer = http.post(COMPLETIONS, json={"model": BASE, "prompt": "abc", "max_tokens": 4, "ignore_eos": True})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    engine = app.state.engine
    stats = asyncio.run(engine.stats())
    assert stats.running == stats.waiting == 0
    assert stats.free_blocks == stats.num_blocks
    lora = engine._engine.lora_manager
    assert not lora.host._pins and not lora.host._loading
    served = {binding.content_hash for binding in lora.host._bindings.values()}
    assert {owner for owner in lora.slots.owner if owner is not None} <= served  # no slot keeps a removed one
    admission = serving_of(engine).admission
    assert admission.waiting == 0 and not admission._running
