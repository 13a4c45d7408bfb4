"""The OpenAI-compatible server, run as a real subprocess and driven with the official `openai` client and raw
HTTP. The reference for every generation is the offline `LLM` on the same files, in this process."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
import transformers

from loraserve import LLM, LoRARequest, SamplingParams
from lora_fixtures import make_peft_adapter
from server_utils import ServerProcess
from tiny_models import make_sharp_tiny_model

KEY = "test-key"
BASE = "tiny"
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "256", "--block-size", "4"]
PROMPTS = ["The quick brown fox", "Hello, world", "abc", "Once upon a time"]
# name -> LoraConfig kwargs; a3 is registered with the JSON form, a4 only at run time
ADAPTERS = {
    "a0": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    "a2": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "a3": dict(r=16, lora_alpha=16, target_modules=["v_proj", "down_proj"]),
    "a4": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
}
GREEDY = dict(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_path = make_sharp_tiny_model("llama", root / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    adapters = {name: str(make_peft_adapter(model, root / name, seed=i + 1, **kwargs))
                for i, (name, kwargs) in enumerate(ADAPTERS.items())}
    too_big = make_peft_adapter(model, root / "rank32", r=32, target_modules=["q_proj"])
    return {"root": root, "model": str(model_path), "adapters": adapters, "rank32": str(too_big)}


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    modules = [f"{name}={a[name]}" for name in ("a0", "a1", "a2")]
    modules.append(json.dumps({"name": "a3", "path": a["a3"], "base_model_name": "tiny-parent"}))
    proc = ServerProcess([files["model"], *ENGINE_ARGS, "--served-model-name", BASE, "--enable-lora",
                          "--max-loras", "2", "--lora-modules", *modules, "--allow-runtime-lora-updating",
                          "--api-key", KEY], files["root"] / "server.log")
    yield proc.wait_healthy()
    assert proc.stop() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def offline(files):
    return LLM(files["model"], dtype="float32", max_model_len=128, num_kv_blocks=256, block_size=4,
               enable_lora=True, max_loras=2, max_cpu_loras=8)


@pytest.fixture(scope="module")
def lora_requests(files):
    return {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(files["adapters"].items())}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def offline_texts(offline, lora_requests, model, prompts, **params):
    lora = None if model == BASE else lora_requests[model]
    outputs = offline.generate(prompts, SamplingParams(**params), use_tqdm=False, lora_request=lora)
    return [c.text for o in outputs for c in o.outputs]


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + label + '}') if label else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- endpoints ---------------------------------------------------------------------------------------


def test_models_health_version(server, client, http, files):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [BASE, "a0", "a1", "a2", "a3"]
    assert cards[BASE].root == files["model"] and cards[BASE].parent is None
    for name in ("a0", "a1", "a2"):
        assert cards[name].parent == BASE and cards[name].root == files["adapters"][name]
    assert cards["a3"].parent == "tiny-parent"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed outside /v1
    assert httpx.get(f"{server.url}/version").json()["version"]


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
        texts, finish, usage = {}, {}, None
        for chunk in client.completions.create(model="a0", prompt=PROMPTS[0], stream=True,
                                               stream_options={"include_usage": True}, **params):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                finish[c.index] = c.finish_reason or finish.get(c.index)
        assert texts == {c.index: c.text for c in plain.choices}
        assert finish == {c.index: c.finish_reason for c in plain.choices}
        assert usage == plain.usage
    assert texts[0] != texts[1]  # sampled with seeds 7 and 8: two different samples
    assert plain.choices[0].text  # stop case had some text before the stop string
    stopped = client.completions.create(model="a0", prompt=PROMPTS[0], **cases[0])
    assert stopped.choices[0].text == full[:full.index(stop)] and stopped.choices[0].finish_reason == "stop"

    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="a1", messages=messages, temperature=0, max_tokens=16, stop=[stop])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a1", messages=messages, temperature=0, max_tokens=16, stop=[stop], stream=True) if c.choices)
    assert streamed == plain.choices[0].message.content


def test_logprobs_equal_offline(client, offline, lora_requests):
    expected = offline.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
                                use_tqdm=False, lora_request=lora_requests["a2"])[0].outputs[0]
    response = client.completions.create(model="a2", prompt=PROMPTS[1], temperature=0, max_tokens=6, logprobs=3,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    want = [entry[t].logprob for t, entry in zip(expected.token_ids, expected.logprobs)]
    assert logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    # keyed by token text as OpenAI does (byte tokens that decode to the same text share a key)
    want_top = [{lp.decoded_token: lp.logprob for lp in entry.values()} for entry in expected.logprobs]
    assert [top.keys() for top in logprobs.top_logprobs] == [top.keys() for top in want_top]
    assert [list(top.values()) for top in logprobs.top_logprobs] == [pytest.approx(list(top.values()), abs=1e-4)
                                                                    for top in want_top]

    chat = client.chat.completions.create(model="a2", messages=[{"role": "user", "content": "x"}], temperature=0,
                                          max_tokens=5, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)  # greedy picks the top token


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
    assert "late" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="late", prompt=PROMPTS[0], temperature=0, max_tokens=10,
                                    extra_body={"ignore_eos": True})
    assert [got.choices[0].text] == expected
    assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": files["adapters"][
        "a0"]}), 400, "lora_name")
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    assert "late" not in [m.id for m in client.models.list().data]
    error = assert_openai_error(http.post("/v1/completions", json={"model": "late", "prompt": "x"}), 404, "model")
    assert "late" in error["message"] and error["code"] == "model_not_found"
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}), 404, "lora_name")


def test_runtime_load_errors_name_the_reason(http, files):
    missing = files["root"] / "missing"
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "m",
                                                                         "lora_path": str(missing)}), 400)
    assert str(missing) in error["message"]
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "big",
                                                                         "lora_path": files["rank32"]}), 400)
    assert "rank 32" in error["message"] and "max_lora_rank=16" in error["message"]
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": BASE}), 400, "lora_name")


# ---- errors --------------------------------------------------------------------------------------

LONG = "x" * 200
BAD_REQUESTS = [
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


def test_api_key_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{server.url}/v1/completions", json={"model": BASE, "prompt": "x"}, headers=headers)
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_still_healthy_after_errors(server, client, http):
    for body in (b"\xff\xfe", b"", b"null", b'{"model": 1, "prompt": null}'):
        assert_openai_error(http.post("/v1/completions", content=body,
                                      headers={"Content-Type": "application/json"}), 400)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(model=BASE, prompt="ok", max_tokens=2).choices[0].finish_reason


# ---- load ----------------------------------------------------------------------------------------


def test_64_concurrent_requests_over_4_adapters(server, offline, lora_requests):
    """max_loras is 2, so the four adapters take turns in the two slots; every answer must still be exact."""
    names = ["a0", "a1", "a2", "a3"]
    jobs = [(names[i % 4], f"{PROMPTS[i % 4]} #{i}") for i in range(64)]
    expected = {}
    for name in names:
        prompts = [p for n, p in jobs if n == name]
        expected |= {(name, p): t for p, t in zip(prompts, offline_texts(offline, lora_requests, name, prompts,
                                                                          temperature=0, max_tokens=8,
                                                                          ignore_eos=True))}

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300) as c:
            responses = await asyncio.gather(*[
                c.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=8,
                                     extra_body={"ignore_eos": True}) for name, prompt in jobs])
        return [r.choices[0].text for r in responses]

    assert asyncio.run(run()) == [expected[job] for job in jobs]


def test_disconnected_stream_frees_kv_blocks(server, http):
    before = http.get("/metrics").text
    total = metric(before, "loraserve_kv_cache_blocks")
    aborted = metric(before, "loraserve_requests_total", model="a1", outcome="aborted")
    body = {"model": "a1", "prompt": "abc", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # generation has started; now hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if metric(text, "loraserve_requests_total", model="a1", outcome="aborted") > aborted:
            break
        time.sleep(0.1)
    assert metric(text, "loraserve_requests_total", model="a1", outcome="aborted") == aborted + 1
    assert metric(text, "loraserve_kv_cache_free_blocks") == total
    assert metric(text, "loraserve_num_requests_running") == 0


def test_metrics(http, client):
    before = http.get("/metrics").text
    response = client.completions.create(model="a2", prompt="metrics", max_tokens=5, extra_body={"ignore_eos": True})
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name, delta in (("loraserve_generation_tokens_total", 5),
                        ("loraserve_prompt_tokens_total", response.usage.prompt_tokens),
                        ("loraserve_requests_total", 1), ("loraserve_time_to_first_token_seconds_count", 1),
                        ("loraserve_inter_token_latency_seconds_count", 4)):
        labels = {"model": "a2", "outcome": "finished"} if name == "loraserve_requests_total" else {"model": "a2"}
        assert metric(text, name, **labels) - metric(before, name, **labels) == delta, name
    assert metric(text, "loraserve_lora_slots") == 2
    assert metric(text, "loraserve_lora_slot_cache_events_total", event="load") >= 4  # 4 adapters, 2 slots
    assert metric(text, "loraserve_lora_slot_cache_events_total", event="eviction") >= 2
    assert metric(text, "loraserve_lora_load_seconds_count") >= 4
    assert "loraserve_num_requests_waiting" in text and "loraserve_kv_cache_usage_perc" in text


# ---- a server without adapters: start-up checks, disabled runtime loading, graceful stop ------------


def test_bad_startup_adapter_stops_the_server(files):
    proc = ServerProcess([files["model"], *ENGINE_ARGS, "--enable-lora", "--lora-modules",
                          f"big={files['rank32']}"], files["root"] / "bad.log")
    assert proc.wait_exit(180) != 0
    assert "'big'" in proc.log() and "32" in proc.log()


def test_plain_server_and_sigterm(files):
    proc = ServerProcess([files["model"], *ENGINE_ARGS, "--shutdown-timeout", "1"],
                         files["root"] / "plain.log").wait_healthy()
    try:
        url = proc.url
        model = files["model"]  # served under its path when --served-model-name is not given
        assert_openai_error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "."}), 404)
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "a0", "prompt": "x"}), 404, "model")
        warm = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=300)
        assert warm.status_code == 200

        lines: list[str] = []

        def stream() -> None:  # a long request that is still running when SIGTERM comes
            body = {"model": model, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True,
                    "temperature": 0}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
                    for line in response.iter_lines():
                        lines.append(line)
            except httpx.HTTPError:
                lines.append("<closed>")

        reader = threading.Thread(target=stream)
        reader.start()
        while not lines and reader.is_alive():
            time.sleep(0.01)
        start = time.monotonic()
        assert proc.stop(timeout=10) == 0, proc.log()[-3000:]
        assert time.monotonic() - start < 8
        reader.join(10)
        assert not reader.is_alive() and lines
    finally:
        proc.stop()
