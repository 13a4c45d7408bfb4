"""Tenants, adapter roots and limits against a real `loraserve serve` process over HTTP: each key sees, uses,
loads and unloads only its adapters, and another tenant's adapter is as absent as an unknown one; runtime
adapter paths stay inside --lora-roots; every limit answers its status with a message that names the flag;
every refusal is counted by reason in /metrics and logged as one JSON line that never holds a key; SIGHUP
re-reads the keys file while a stream runs on. Generations are checked against the offline engine."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import pytest
import torch

from loraserve import LLM
from server_utils import (
    BASE,
    ENGINE_OPTIONS,
    ServerProcess,
    assert_openai_error,
    engine_flags,
    make_server_files,
    metric,
    offline_texts,
)

KEYS = {
    "key-a-0123456789": {"adapters": ["a0", "a1"], "tenant": "team-a"},
    "key-b-0123456789": {"adapters": ["b-*"], "max_concurrency": 1, "tenant": "team-b"},
    "key-root-0123456789": ["*"],
}
A, B, ROOT = list(KEYS)
LIMITS = {"--max-body-bytes": 4096, "--max-prompts-per-request": 3, "--max-stop-strings": 2, "--max-stop-length": 8,
          "--max-prompt-tokens": 24, "--max-waiting-requests": 2}
OPTIONS = ENGINE_OPTIONS | dict(max_model_len=512, num_kv_blocks=512)  # long enough for a stream to be in flight
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    files = make_server_files(tmp_path_factory.mktemp("security") / "root")
    outside = tmp_path_factory.mktemp("outside")
    files["outside"] = shutil.copytree(files["adapters"]["a2"], outside / "a2")
    (files["root"] / "link-out").symlink_to(files["outside"], target_is_directory=True)
    pickled = shutil.copytree(files["adapters"]["a2"], files["root"] / "pickled")
    from safetensors.torch import load_file
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    files["keys"] = tmp_path_factory.mktemp("keys") / "keys.json"
    files["keys"].write_text(json.dumps(KEYS))
    return files


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    modules = [f"{name}={a[name]}" for name in ("a0", "a1")] + [f"b-2={a['a2']}"]
    limits = [str(item) for flag, value in LIMITS.items() for item in (flag, value)]
    proc = ServerProcess([files["model"], *engine_flags(OPTIONS), "--served-model-name", BASE,
                          "--enable-lora", "--max-loras", "2", "--lora-modules", *modules,
                          "--allow-runtime-lora-updating", "--api-keys-file", str(files["keys"]),
                          "--lora-roots", str(files["root"]), "--log-format", "json", *limits],
                         files["root"].parent / "server.log")
    yield proc.wait_healthy()
    assert proc.stop() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def offline(files):
    return LLM(files["model"], **OPTIONS, enable_lora=True, max_loras=2)


def client(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def completion(http: httpx.Client, model: str, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "The quick brown fox"} | GREEDY | body)


def test_missing_or_wrong_key_is_401(server):
    for key in (None, "wrong", A[:-1], A + "x"):
        with client(server, key) as http:
            error = assert_openai_error(completion(http, BASE), 401)
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Basic {A}"}) as http:
        assert_openai_error(http.get("/v1/models"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200  # outside /v1: no key needed


def test_each_key_sees_and_uses_only_its_adapters(server, files, offline):
    loras = {name: files["adapters"][source] for name, source in (("a0", "a0"), ("a1", "a1"), ("b-2", "a2"))}
    from loraserve import LoRARequest
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(loras.items())}
    for key, visible in ((A, {"a0", "a1"}), (B, {"b-2"}), (ROOT, {"a0", "a1", "b-2"})):
        with client(server, key) as http:
            cards = http.get("/v1/models").json()["data"]
            assert {c["id"] for c in cards} == {BASE} | visible
            for name in ("a0", "b-2"):
                response = completion(http, name)
                if name in visible:
                    assert response.json()["choices"][0]["text"] == offline_texts(
                        offline, requests, name, ["The quick brown fox"], **GREEDY)[0]
                else:  # exactly the answer for a name nobody serves
                    hidden = assert_openai_error(response, 404, "model")
                    unknown = assert_openai_error(completion(http, "nobody-serves-this"), 404, "model")
                    assert hidden == json.loads(json.dumps(unknown).replace("nobody-serves-this", name))
            assert completion(http, BASE).status_code == 200  # every key may use the base model
    with client(server, A) as http:  # a mix naming another tenant's adapter: as if it were unknown
        mixed = completion(http, BASE, adapters=[{"name": "a0", "weight": 0.5}, {"name": "b-2", "weight": 0.5}])
        unknown = completion(http, BASE, adapters=[{"name": "a0", "weight": 0.5}, {"name": "zz", "weight": 0.5}])
        assert assert_openai_error(mixed, 400, "adapters")["message"] == \
            assert_openai_error(unknown, 400, "adapters")["message"].replace("zz", "b-2")


def test_runtime_loads_stay_inside_the_roots_and_the_keys_globs(server, files):
    root = files["root"]
    with client(server, ROOT) as http:
        def load(name: str, path: str) -> httpx.Response:
            return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

        for path in (f"{root}/../outside/a2", str(files["outside"]), str(root / "link-out"), "/etc",
                     f"{root}/a0/../../outside/a2"):
            error = assert_openai_error(load("x", path), 403, "lora_path")
            assert "--lora-roots" in error["message"]
            missing = assert_openai_error(load("x", "/no/such/folder"), 403, "lora_path")  # existence not told
            assert error["message"].replace(path, "P") == missing["message"].replace("/no/such/folder", "P")
        assert "--allow-lora-bin" in assert_openai_error(load("x", str(root / "pickled")), 403)["message"]
        assert load("b-new", str(root / "a4")).status_code == 200
        assert load("b-rel", f"{root}/a0/../a4").status_code == 200  # '..' that stays inside is fine
    with client(server, B) as http:
        assert completion(http, "b-new").status_code == 200
        error = assert_openai_error(http.post("/v1/load_lora_adapter",
                                              json={"lora_name": "a9", "lora_path": str(root / "a4")}), 403)
        assert "b-*" in error["message"]
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "a0"})  # team-a's: as if unknown
        unknown = http.post("/v1/unload_lora_adapter", json={"lora_name": "zz"})
        assert assert_openai_error(gone, 404)["message"] == assert_openai_error(unknown, 404)["message"].replace(
            "zz", "a0")
        for name in ("b-new", "b-rel"):
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    with client(server, A) as http:
        assert completion(http, "a0").status_code == 200


LIMIT_CASES = [  # body, status, param, words the message must hold
    ({"prompt": ["a", "b", "c", "d"]}, 400, "prompt", "--max-prompts-per-request"),
    ({"stop": ["a", "b", "c"]}, 400, "stop", "--max-stop-strings"),
    ({"stop_token_ids": [1, 2, 3]}, 400, "stop_token_ids", "--max-stop-strings"),
    ({"stop": "a stop string too long"}, 400, "stop", "--max-stop-length"),
    ({"prompt": "x" * 40}, 400, "prompt", "--max-prompt-tokens"),
    ({"n": 1000}, 400, "n", "--max-n"),
    ({"max_tokens": 1000}, 400, "max_tokens", "maximum context length"),
]


def test_every_limit_has_its_status_and_message(server):
    with client(server, A) as http:
        for body, status, param, words in LIMIT_CASES:
            error = assert_openai_error(completion(http, BASE, **body), status, param)
            assert words in error["message"], (body, error)
        chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c"]}
        assert "--max-stop-strings" in assert_openai_error(http.post("/v1/chat/completions", json=chat), 400)[
            "message"]
        big = json.dumps({"model": BASE, "prompt": "x" * 5000}).encode()
        error = assert_openai_error(http.post("/v1/completions", content=big,
                                              headers={"Content-Type": "application/json"}), 413)
        assert "--max-body-bytes" in error["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000
        assert_openai_error(http.post("/v1/completions", content=chunks()), 413)
        response = completion(http, BASE, prompt=["a", "b"], n=2)  # samples do not count against the limits
        assert response.status_code == 200 and len(response.json()["choices"]) == 4


def test_waiting_and_concurrency_limits(server):
    """Past --max-waiting-requests: 503 with Retry-After; past a key's max_concurrency: 429 with Retry-After,
    and the key is served again once its request ends."""
    with client(server, ROOT) as http:  # 3 prompts when at most 2 may wait to start
        refused = http.post("/v1/completions", json={"model": BASE, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert refused.headers["retry-after"] == "1"
        assert "--max-waiting-requests" in assert_openai_error(refused, 503)["message"]
    with client(server, B) as http:
        body = {"model": "b-2", "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # held: a dropped iterator closes the connection, ending the request
            assert running.status_code == 200 and next(lines).startswith("data: {")
            error = assert_openai_error(completion(http, "b-2"), 429)
            assert error["type"] == "rate_limit_error" and "max_concurrency" in error["message"]
        deadline = time.monotonic() + 10
        while (response := completion(http, "b-2")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)  # the stream's end reaches the server a moment after the client closed it
        assert response.status_code == 200


def test_refusals_are_counted_and_logged_without_keys(server):
    with client(server, None) as anonymous, client(server, A) as http:
        assert_openai_error(anonymous.get("/v1/models"), 401)
        assert_openai_error(completion(http, "b-2"), 404)
        assert_openai_error(completion(http, BASE, stop=["a", "b", "c"]), 400)
        text = http.get("/metrics").text
    for reason in ("unauthorized", "model_not_found", "too_many_stops"):
        assert metric(text, "loraserve_requests_refused_total", reason=reason) >= 1, reason
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("event") == "request_refused"]
    assert {line["reason"] for line in refused} >= {"unauthorized", "model_not_found", "too_many_stops"}
    assert any(line["tenant"] == "team-a" and line["status"] == 404 for line in refused)
    log = server.log()
    assert not any(key in log for key in KEYS)


def test_sighup_reloads_the_keys_without_dropping_a_stream(server, files, offline):
    new_key = "key-c-0123456789"
    body = {"model": BASE, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}
    expected = offline_texts(offline, {}, BASE, ["Once upon a time"], temperature=0, max_tokens=40, ignore_eos=True)
    try:
        with client(server, A) as http, http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            files["keys"].write_text(json.dumps({A: KEYS[A], new_key: ["a1"]}))  # B dropped, C added
            os.kill(server.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            with client(server, new_key) as c:
                while c.get("/v1/models").status_code == 401 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert {card["id"] for card in c.get("/v1/models").json()["data"]} == {BASE, "a1"}
            with client(server, B) as b:
                assert_openai_error(b.get("/v1/models"), 401)
            chunks = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected[0]
        files["keys"].write_text("{not json")  # a broken file: the old keys stay
        os.kill(server.process.pid, signal.SIGHUP)
        time.sleep(0.5)
        with client(server, new_key) as c:
            assert c.get("/v1/models").status_code == 200
        assert server.process.poll() is None
    finally:
        files["keys"].write_text(json.dumps(KEYS))
        os.kill(server.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        with client(server, B) as b:
            while b.get("/v1/models").status_code == 401 and time.monotonic() < deadline:
                time.sleep(0.1)
