"""The OpenAI-compatible API in-process: the real app over a real AsyncLLMEngine, driven with the official
`openai` client and raw HTTP through Starlette's test client (no socket). The reference for every generation
is the offline `LLM` on the same files. Start-up, signals, disconnects and adapter swaps under running
streams are tested against a real server process in test_server.py."""
from __future__ import annotations

import asyncio
import copy
import json
import re
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.engine import LLMEngine
from loraserve.server.adapters import LoRAModule
from loraserve.server.api import ServerSettings, build_app
from server_utils import (
    BASE,
    ENGINE_OPTIONS,
    KEY,
    assert_openai_error,
    make_server_files,
    metric,
    metric_families,
    offline_texts,
    sample,
    scrape_during_stream,
)

PROMPTS = ["The quick brown fox", "Hello, world", "abc", "Once upon a time"]
GREEDY = dict(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_server_files(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def app(files):
    # cold adapters parsed between steps, as where the compute threads fill every core (the server's default
    # there); test_server.py's server processes, one compute thread each, run them beside the steps
    config = EngineConfig.from_options(model=files["model"], **ENGINE_OPTIONS, enable_lora=True, max_loras=2,
                                       max_cpu_loras=4)
    engine = AsyncLLMEngine(LLMEngine(config), cold_loads_between_steps=True)
    a = files["adapters"]
    modules = [LoRAModule(name, a[name]) for name in ("a0", "a1", "a2")] + [LoRAModule("a3", a["a3"], "tiny-parent")]
    app = build_app(engine, ServerSettings([BASE], modules, api_key=KEY, allow_runtime_lora_updating=True))
    app.state.engine = engine
    yield app
    engine.shutdown()


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as transport:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, max_retries=0, http_client=transport)


@pytest.fixture(scope="module")
def offline(files):
    return LLM(files["model"], **ENGINE_OPTIONS, enable_lora=True, max_loras=2, max_cpu_loras=8)


@pytest.fixture(scope="module")
def lora_requests(files):
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(files["adapters"].items())}


def stream_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, str | None], dict[int, list[int]], object]:
    """Text, finish reason and logprobs text offsets per choice index from a streamed completion."""
    texts, finish, offsets, usage = {}, {}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finish[c.index] = c.finish_reason or finish.get(c.index)
            if c.logprobs is not None:
                offsets.setdefault(c.index, []).extend(c.logprobs.text_offset)
    return texts, finish, offsets, usage


# ---- endpoints ---------------------------------------------------------------------------------------


def test_models_health_version(client, http, files):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [BASE, "a0", "a1", "a2", "a3"]
    assert cards[BASE].root == files["model"] and cards[BASE].parent is None
    for name in ("a0", "a1", "a2"):
        assert cards[name].parent == BASE and cards[name].root == files["adapters"][name]
    assert cards["a3"].parent == "tiny-parent"
    assert http.get("/health", headers={"Authorization": ""}).status_code == 200  # no key needed outside /v1
    assert http.get("/version").json()["version"]


@pytest.mark.parametrize("model", [BASE, "a0", "a3"])
def test_greedy_completions_equal_offline(client, offline, lora_requests, model):
    expected = offline_texts(offline, lora_requests, model, PROMPTS, **GREEDY)
    response = client.completions.create(model=model, prompt=PROMPTS, temperature=0, max_tokens=10,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected
    assert response.model == model
    assert response.usage.completion_tokens == 10 * len(PROMPTS)


def test_prompt_forms_and_n(client, offline, lora_requests):
    tokenizer = offline.get_tokenizer()
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    expected = offline_texts(offline, lora_requests, "a1", PROMPTS[:2], **GREEDY)
    one = client.completions.create(model="a1", prompt=ids[0], temperature=0, max_tokens=10,
                                    extra_body={"ignore_eos": True})
    assert one.choices[0].text == expected[0] and one.usage.prompt_tokens == len(ids[0])
    many = client.completions.create(model="a1", prompt=ids, n=2, temperature=0, max_tokens=10,
                                     extra_body={"ignore_eos": True})
    assert [(c.index, c.text) for c in many.choices] == [(0, expected[0]), (1, expected[0]), (2, expected[1]),
                                                          (3, expected[1])]
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and many.usage.completion_tokens == 40


def test_chat_equals_offline(client, offline, lora_requests):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                            lora_request=lora_requests["a2"])[0]
    response = client.chat.completions.create(model="a2", messages=messages, temperature=0,
                                              max_completion_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def _stop_for(text: str) -> str:
    """Two printable characters from the middle of `text`: a stop string that spans several tokens."""
    for i in range(2, len(text) - 1):
        if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2]:
            return text[i:i + 2]
    raise AssertionError(f"no printable pair in {text!r}")


def test_streaming_equals_non_streaming(client, offline, lora_requests):
    full = offline_texts(offline, lora_requests, "a0", PROMPTS[:1], temperature=0, max_tokens=24, ignore_eos=True)[0]
    stop = _stop_for(full)
    cases = [dict(temperature=0, max_tokens=24, stop=[stop]),  # the stop string must not leak into the stream
             dict(temperature=0.9, seed=7, n=2, max_tokens=16)]
    for params in cases:
        plain = client.completions.create(model="a0", prompt=PROMPTS[0], **params)
        texts, finish, _, usage = stream_completion(client, model="a0", prompt=PROMPTS[0], **params)
        assert texts == {c.index: c.text for c in plain.choices}
        assert finish == {c.index: c.finish_reason for c in plain.choices}
        assert usage == plain.usage
    assert texts[0] != texts[1]  # sampled with seeds 7 and 8: two different samples
    stopped = client.completions.create(model="a0", prompt=PROMPTS[0], **cases[0])
    assert stopped.choices[0].text == full[:full.index(stop)] and stopped.choices[0].finish_reason == "stop"

    # chat: a stop string taken from this very answer, so it is certain to be met
    messages = [{"role": "user", "content": "hi"}]
    chat_full = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False,
                             lora_request=lora_requests["a1"])[0].outputs[0].text
    chat_stop = _stop_for(chat_full)
    ask = dict(model="a1", messages=messages, temperature=0, max_tokens=16, stop=[chat_stop],
               extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**ask).choices[0]
    assert plain.message.content == chat_full[:chat_full.index(chat_stop)]  # cut before the stop, which is left out
    assert chat_stop not in plain.message.content and plain.finish_reason == "stop"
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == plain.message.content
    assert [c.finish_reason for c in chunks if c.finish_reason is not None] == ["stop"]
    assert chunks[-1].finish_reason == "stop"


def test_stop_string_inside_min_tokens_window_streamed_and_not(client, offline):
    """A stop string that appears while min_tokens still holds stops back must not cut the text later:
    the answer keeps it and ends at its next appearance (or at max_tokens), streamed or not."""
    full = offline.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    tokenizer = offline.get_tokenizer()
    stop, first = next((full.text[i:i + 1], i) for i in range(len(full.text)) if full.text[i:i + 1].isalnum())
    window = next(k for k in range(1, 41) if len(tokenizer.decode(full.token_ids[:k])) > first) + 1
    rest = full.text[first + 1:]
    expected = full.text[:first + 1 + rest.index(stop)] if stop in rest else full.text
    params = dict(model=BASE, prompt=PROMPTS[3], temperature=0, max_tokens=40, stop=[stop],
                  extra_body={"ignore_eos": True, "min_tokens": window})
    plain = client.completions.create(**params)
    texts, _, _, _ = stream_completion(client, **params)
    assert plain.choices[0].text == texts[0] == expected
    assert stop in expected  # the early appearance survived


def test_multibyte_text_and_offsets_streamed_and_not(client, offline):
    """The tiny model emits raw bytes, splitting characters over tokens: the text equals the tokenizer's
    decode of the tokens, and logprobs.text_offset points where each token's text begins, in both forms."""
    tokenizer = offline.get_tokenizer()
    checked_split = False
    for seed in range(12):
        params = dict(model=BASE, prompt=f"bytes {seed}", temperature=1.0, seed=seed, max_tokens=14, logprobs=0,
                      extra_body={"ignore_eos": True})
        plain = client.completions.create(**params).choices[0]
        texts, _, offsets, _ = stream_completion(client, **params)
        ids = offline.generate(f"bytes {seed}", SamplingParams(temperature=1.0, seed=seed, max_tokens=14,
                                                               ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
        assert plain.text == texts[0] == tokenizer.decode(ids, skip_special_tokens=True)
        reference = [len(tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd"))
                     for i in range(len(ids))]
        assert plain.logprobs.text_offset == offsets[0] == reference
        checked_split |= any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))
    assert checked_split


def test_logprobs_equal_offline(client, offline, lora_requests):
    expected = offline.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
                                use_tqdm=False, lora_request=lora_requests["a2"])[0].outputs[0]
    response = client.completions.create(model="a2", prompt=PROMPTS[1], temperature=0, max_tokens=6, logprobs=3,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    want = [entry[t].logprob for t, entry in zip(expected.token_ids, expected.logprobs, strict=True)]
    assert logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    # keyed by token text as OpenAI does (byte tokens that decode to the same text share a key)
    want_top = [{lp.decoded_token: lp.logprob for lp in entry.values()} for entry in expected.logprobs]
    assert [top.keys() for top in logprobs.top_logprobs] == [top.keys() for top in want_top]
    assert [list(top.values()) for top in logprobs.top_logprobs] == [pytest.approx(list(top.values()), abs=1e-4)
                                                                    for top in want_top]


def test_chat_logprobs_equal_peft_forward(client, offline, lora_requests, files):
    """Chat logprobs against an independent computation: log-softmax of transformers + PEFT logits (the
    same adapter) over the prompt and the answer's tokens; the top alternatives are the two largest there."""
    messages = [{"role": "user", "content": "x"}]
    reference = offline.chat(messages, SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True),
                             use_tqdm=False,
                             lora_request=lora_requests["a2"])[0]
    prompt, answer = reference.prompt_token_ids, reference.outputs[0].token_ids
    chat = client.chat.completions.create(model="a2", messages=messages, temperature=0, max_tokens=5, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == reference.outputs[0].text
    assert chat.usage.prompt_tokens == len(prompt) and chat.usage.completion_tokens == len(answer) == 5

    peft = PeftModel.from_pretrained(copy.deepcopy(files["hf"]), files["adapters"]["a2"]).eval()
    with torch.no_grad():
        logits = peft(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
    want = torch.log_softmax(logits, dim=-1)
    top = want.topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == answer  # greedy: the answer is the reference's argmax
    content = chat.choices[0].logprobs.content
    assert len(content) == len(answer)
    for i, (token, token_id, entry) in enumerate(zip(content, answer, reference.outputs[0].logprobs, strict=True)):
        assert token.token == entry[token_id].decoded_token and token.bytes == list(token.token.encode())
        assert token.logprob == pytest.approx(want[i, token_id].item(), abs=1e-4)
        assert [alt.token for alt in token.top_logprobs] == [entry[t].decoded_token for t in top.indices[i].tolist()]
        assert [alt.logprob for alt in token.top_logprobs] == pytest.approx(top.values[i].tolist(), abs=1e-4)
        assert token.top_logprobs[0].logprob == token.logprob


def test_sampling_extras_change_output(client):
    """top_k=1 is greedy whatever the temperature; min_p=1 keeps only the top token too."""
    greedy = client.completions.create(model="a0", prompt=PROMPTS[2], temperature=0, max_tokens=8).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        hot = client.completions.create(model="a0", prompt=PROMPTS[2], temperature=1.5, max_tokens=8, seed=3,
                                        extra_body=extra)
        assert hot.choices[0].text == greedy


# ---- adapters at run time ------------------------------------------------------------------------


def test_runtime_load_use_unload(client, http, offline, lora_requests, files):
    expected = offline_texts(offline, lora_requests, "a4", PROMPTS[:1], **GREEDY)
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": files["adapters"]["a4"]})
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "Success: LoRA adapter 'late' added successfully."
    report, offline_report = response.json()["lora"], offline.lora_report(lora_requests["a4"])
    for key in ("content_hash", "kinds", "rank_by_module", "scaling_by_module", "targets_by_layer", "host_bytes"):
        assert report[key] == offline_report[key], key
    card = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == "late")
    assert card["lora"] == report
    assert "late" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="late", prompt=PROMPTS[0], temperature=0, max_tokens=10,
                                    extra_body={"ignore_eos": True})
    assert [got.choices[0].text] == expected
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": files[
        "adapters"]["a0"]}), 400, "lora_name")
    assert "load_inplace" in error["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert "late" not in [m.id for m in client.models.list().data]
    error = assert_openai_error(http.post("/v1/completions", json={"model": "late", "prompt": "x"}), 404, "model")
    assert "late" in error["message"] and error["code"] == "model_not_found"
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404, "lora_name")


def test_load_inplace_swaps_the_weights(client, http, offline, lora_requests, files):
    a0, a4 = (offline_texts(offline, lora_requests, name, PROMPTS[:1], **GREEDY) for name in ("a0", "a4"))
    body = {"lora_name": "swap", "lora_path": files["adapters"]["a0"]}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    ask = dict(model="swap", prompt=PROMPTS[0], temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    assert [client.completions.create(**ask).choices[0].text] == a0
    body = {"lora_name": "swap", "lora_path": files["adapters"]["a4"], "load_inplace": True}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert [client.completions.create(**ask).choices[0].text] == a4
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200


def test_runtime_load_errors_name_the_reason(http, files):
    missing = files["root"] / "missing"
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "m",
                                                                         "lora_path": str(missing)}), 400)
    assert str(missing) in error["message"]
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "big",
                                                                         "lora_path": files["rank32"]}), 400)
    assert "rank 32" in error["message"] and "max_lora_rank=16" in error["message"]
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": BASE}), 400, "lora_name")
    assert "m" not in [card["id"] for card in http.get("/v1/models").json()["data"]]


def test_two_concurrent_loads_of_one_name(app, http, files):
    """The second load of a name still being loaded is refused at once; nothing of it stays in memory."""
    engine = app.state.engine

    async def both() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*[c.post("/v1/load_lora_adapter", json={
                "lora_name": "twice", "lora_path": files["adapters"][name]}) for name in ("a4", "a2")])

    cached_before = asyncio.run(engine.stats()).lora.host.cached
    first, second = sorted(asyncio.run(both()), key=lambda r: r.status_code)
    assert first.status_code == 200, first.text
    assert "being loaded" in assert_openai_error(second, 400, "lora_name")["message"]
    assert asyncio.run(engine.stats()).lora.host.cached <= cached_before + 1
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "twice"}).status_code == 200


# ---- errors --------------------------------------------------------------------------------------

LONG = "x" * 200
BAD_REQUESTS = [
    # found by tests/test_fuzz.py, each once a 500
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("/v1/completions", {"model": BASE, "prompt": "a\ud800b"}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "min_tokens": 2, "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "\u0000"}, 400, None),
    ("/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "a" * 300}, 400, "lora_path"),
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": BASE, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": [[1, 2], [300]]}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": {"text": "x"}}, 400, "prompt"),
    ("/v1/completions", {"model": BASE}, 400, "prompt"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": "two"}, 400, "n"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "n": 500}, 400, "n"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "bogus": 1}, 400, "bogus"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": BASE, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": BASE, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/no_such_route", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{i}-{b[0].rsplit('/', 1)[-1]}"
                                                                      for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(http, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, status, param)
    if param is not None:
        assert param.rsplit(".", 1)[-1] in error["message"] or error["code"] == "model_not_found"


def test_extreme_sampling_values_sample_sanely(http):
    """Values that once broke the sampler (found by tests/test_fuzz.py): a top_p that is 0 in float32 keeps the
    most likely token (greedy), a tiny temperature is raised to 0.01 (nearly greedy), a top_k beyond 64 bits
    keeps the whole vocabulary."""
    greedy = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 6,
                                                "temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"top_p": 1e-300}, {"temperature": 1e-50, "top_p": 0.5}, {"temperature": 1e-50}):
        response = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 6,
                                                      "seed": 1} | extra)
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy, extra
    response = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello", "max_tokens": 4,
                                                  "top_k": 2**63, "seed": 1})
    assert response.status_code == 200


def test_a_bug_is_a_500_not_the_clients_fault(app, http, monkeypatch, caplog):
    """Only parameter and adapter errors are 400s: any other exception, even a ValueError, is logged and
    answered 500 "internal error" with an id that matches the log line; the exception's text stays in the log,
    and the server serves on."""
    tokenizer = app.state.engine.tokenizer

    def broken(*args, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(tokenizer, "encode", broken)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {KEY}"}) as raw:
        response = raw.post("/v1/completions", json={"model": BASE, "prompt": "text prompts are tokenized"})
    error = assert_openai_error(response, 500)
    assert error["type"] == "server_error" and "an internal mistake" not in error["message"]
    error_id = re.search(r"internal error \(id ([0-9a-f]+)\)", error["message"]).group(1)
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert any(r.exc_info and "an internal mistake" in str(r.exc_info[1]) for r in logged)
    monkeypatch.undo()
    assert http.post("/v1/completions", json={"model": BASE, "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_a_request_the_engine_fails_is_answered_500_and_the_server_serves_on(app, http, monkeypatch, caplog):
    """A fault while computing one request (here the model raises from its third step on) fails that request:
    a 500 error body, or an error event in its stream (it had started), neither holding the exception's text;
    the engine goes on."""
    engine = app.state.engine._engine
    trigger = engine.model.spec.vocab_size - 1
    layer = engine.model.model.layers[0]
    forward = layer.forward
    steps = [0]

    def faulty(x, residual, rotary, batch):
        steps[0] = 1 if bool((batch.input_ids == trigger).any()) else steps[0] + (steps[0] > 0)
        if steps[0] > 2:
            raise RuntimeError("secret-internal-detail")
        return forward(x, residual, rotary, batch)

    monkeypatch.setattr(layer, "forward", faulty)
    body = {"model": BASE, "prompt": [1, trigger, 2], "max_tokens": 8, "ignore_eos": True}
    error = assert_openai_error(http.post("/v1/completions", json=body), 500)
    assert error["type"] == "server_error" and "secret" not in error["message"]
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["type"] == "server_error"
    assert "secret" not in "".join(lines)
    assert "secret-internal-detail" in caplog.text  # logged for the operator
    text = http.get("/metrics").text
    assert metric(text, "loraserve_requests_failed_total", reason="step_error") >= 2
    monkeypatch.undo()
    assert http.post("/v1/completions", json=body).status_code == 200


def test_api_key_required_on_v1(app):
    with TestClient(app) as raw:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = raw.post("/v1/completions", json={"model": BASE, "prompt": "x"}, headers=headers)
            assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", max_retries=0,
                          http_client=raw).models.list()


def test_still_healthy_after_errors(client, http):
    for body in (b"\xff\xfe", b"", b"null", b'{"model": 1, "prompt": null}'):
        assert_openai_error(http.post("/v1/completions", content=body,
                                      headers={"Content-Type": "application/json"}), 400)
    assert http.get("/health").status_code == 200
    assert client.completions.create(model=BASE, prompt="ok", max_tokens=2).choices[0].finish_reason


# ---- load ----------------------------------------------------------------------------------------


def test_64_concurrent_requests_over_4_adapters(app, offline, lora_requests):
    """max_loras is 2, so the four adapters take turns in the two slots; every answer must still be exact."""
    names = ["a0", "a1", "a2", "a3"]
    jobs = [(names[i % 4], f"{PROMPTS[i % 4]} #{i}") for i in range(64)]
    expected = {}
    for name in names:
        prompts = [p for n, p in jobs if n == name]
        expected |= {(name, p): t for p, t in zip(prompts, offline_texts(offline, lora_requests, name, prompts,
                                                                         temperature=0, max_tokens=8,
                                                                         ignore_eos=True), strict=True)}

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as h:
            c = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=KEY, max_retries=0, http_client=h)
            responses = await asyncio.gather(*[
                c.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=8,
                                     extra_body={"ignore_eos": True}) for name, prompt in jobs])
        return [r.choices[0].text for r in responses]

    assert asyncio.run(run()) == [expected[job] for job in jobs]


def test_metrics(http, client, offline):
    before = http.get("/metrics").text
    response = client.completions.create(model="a2", prompt="metrics", max_tokens=5, extra_body={"ignore_eos": True})
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name, delta in (("loraserve_generation_tokens_total", 5),
                        ("loraserve_prompt_tokens_total", response.usage.prompt_tokens),
                        ("loraserve_requests_total", 1), ("loraserve_time_to_first_token_seconds_count", 1),
                        ("loraserve_inter_token_latency_seconds_count", 4)):
        labels = {"model": "a2"} if "seconds" in name else {"model": "a2", "adapter": "a2"}
        labels |= {"outcome": "finished"} if name == "loraserve_requests_total" else {}
        assert metric(text, name, **labels) - metric(before, name, **labels) == delta, name
    assert metric(text, "loraserve_lora_slots") == 2
    assert metric(text, "loraserve_lora_slot_cache_events_total", event="load") >= 4  # 4 adapters, 2 slots
    assert metric(text, "loraserve_lora_slot_cache_events_total", event="eviction") >= 2
    assert metric(text, "loraserve_lora_load_seconds_count") >= 4
    assert "loraserve_num_requests_waiting" in text and "loraserve_kv_cache_usage_perc" in text
    # the same model loaded offline holds the same weights
    assert metric(text, "loraserve_model_weight_bytes") == offline.engine.weight_bytes > 0
    # the process holds at least its weights; what loading added is exported beside them (in this test process
    # other engines came and went before, so its value here says little)
    assert metric(text, "loraserve_resident_memory_bytes") > metric(text, "loraserve_model_weight_bytes")
    assert "loraserve_model_resident_bytes" in text


def test_host_cache_counts_one_event_per_adapter_use(http, client):
    """Each engine request that uses an adapter is one host-cache event (a hit or a load), however often
    the adapter is looked at on the way; requests without one are none."""
    def events(text: str) -> float:
        return sum(metric(text, "loraserve_lora_host_cache_events_total", event=e) for e in ("hit", "load"))

    before = events(http.get("/metrics").text)
    client.completions.create(model="a1", prompt=PROMPTS, max_tokens=2)  # 4 prompts: 4 engine requests
    client.completions.create(model="a0", prompt="one", max_tokens=2, n=3)  # 1 engine request, 3 samples
    client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    client.completions.create(model=BASE, prompt="base", max_tokens=2)
    for _ in stream_completion(client, model="a2", prompt="streamed", max_tokens=3):
        pass
    assert events(http.get("/metrics").text) - before == 4 + 1 + 1 + 1


def test_router_metrics_match_the_engine(app, http, client, files, monkeypatch):
    """The vLLM names Kubernetes LoRA routers scrape, and the load-time histogram, parsed as a scraper parses
    them, against engine state made known here (max_loras=2 slots, max_cpu_loras=4 host copies)."""
    def loaded(families: dict) -> dict[str, tuple[str, str]]:
        assert all(s.value == 1 for s in families["vllm:lora_adapter_loaded"])
        return {s.labels["adapter_name"]: (s.labels["level"], s.labels["rank"])
                for s in families["vllm:lora_adapter_loaded"]}

    hist, summary = "loraserve_lora_load_duration_seconds", "loraserve_lora_load_seconds"

    def loads(families: dict) -> float:
        """The histogram's count, checked against the summary and the host cache's load events."""
        count = sample(families, hist, f"{hist}_count")
        buckets = [s.value for s in families[hist] if s.name == f"{hist}_bucket"]
        assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf last
        assert sample(families, hist, f"{hist}_sum") == pytest.approx(sample(families, summary, f"{summary}_sum"))
        assert count == sample(families, summary, f"{summary}_count") == sample(
            families, "loraserve_lora_host_cache_events", "loraserve_lora_host_cache_events_total", event="load")
        return count

    before = loads(metric_families(http.get("/metrics").text))
    body = {"lora_name": "timed", "lora_path": files["adapters"]["a4"]}  # a new id: one read from disk
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert loads(metric_families(http.get("/metrics").text)) == before + 1
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "timed"}).status_code == 200
    for name in ("a2", "a3", "a0", "a1"):  # host memory: these four; the two slots: the last two
        client.completions.create(model=name, prompt="x", max_tokens=1)
    start = time.time()
    idle = metric_families(http.get("/metrics").text)
    assert loaded(idle) == {"a0": ("gpu", "8"), "a1": ("gpu", "4"), "a2": ("cpu", "8"), "a3": ("cpu", "16")}
    assert sample(idle, "vllm:num_gpu_loaded_lora_adapters") == sample(idle, "vllm:max_gpu_lora_adapters") == 2
    assert sample(idle, "vllm:cache_config_info", block_size="4", num_gpu_blocks="256") == 1
    assert len(idle["vllm:cache_config_info"]) == 1 and ENGINE_OPTIONS["num_kv_blocks"] == 256
    assert start <= sample(idle, "vllm:lora_requests_info", running_lora_adapters="", waiting_lora_adapters="",
                           max_lora="2") <= time.time()
    assert loads(idle) == asyncio.run(app.state.engine.stats()).lora.host.loads
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert sample(idle, f"vllm:{name}") == sample(idle, f"loraserve_{name}"), name
    assert sample(idle, "vllm:num_requests_running") == 0

    step = LLMEngine.step

    def slow_step(self):
        time.sleep(0.02)  # the request below outlives the scrape by a second
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", slow_step)
    mix = [{"name": "a3"}, {"name": "a2", "weight": 0.5}]  # a mix runs as each of its adapters, names sorted
    body = {"model": "a3", "adapters": mix, "prompt": "a long one", "max_tokens": 60, "ignore_eos": True,
            "stream": True}
    text, still_open = asyncio.run(scrape_during_stream(app, body))
    monkeypatch.undo()
    assert still_open
    busy = metric_families(text)
    assert sample(busy, "vllm:lora_requests_info", running_lora_adapters="a2,a3", waiting_lora_adapters="",
                  max_lora="2") > start
    assert sample(busy, "vllm:num_requests_running") == sample(busy, "loraserve_num_requests_running") >= 1
    assert sample(busy, "vllm:kv_cache_usage_perc") == sample(busy, "loraserve_kv_cache_usage_perc") > 0
    # the mix took both slots from a0 and a1, which stay in host memory
    assert loaded(busy) == {"a0": ("cpu", "8"), "a1": ("cpu", "4"), "a2": ("gpu", "8"), "a3": ("gpu", "16")}
