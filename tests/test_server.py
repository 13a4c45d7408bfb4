"""`loraserve serve` as a real subprocess, driven over HTTP with the official `openai` client and raw httpx:
end to end, start-up checks, SIGTERM, client disconnects, and adapters unloaded or reloaded in place while
a stream still uses them. The reference for every generation is the offline `LLM` on the same files. The
API's shapes and errors are tested in-process in test_server_api.py."""
from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import httpx
import openai
import pytest

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRAMix, LoRARequest, SamplingParams
from server_utils import (
    ADAPTERS,
    BASE,
    ENGINE_OPTIONS,
    KEY,
    ServerProcess,
    assert_openai_error,
    engine_flags,
    make_server_files,
    metric,
    offline_texts,
)

PROMPTS = ["The quick brown fox", "Hello, world"]
# Long enough that a stream is still running when the adapter under it is swapped.
LONG_RUN = dict(max_model_len=512, num_kv_blocks=512)
LONG_TOKENS = 400


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_server_files(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    modules = [f"{name}={a[name]}" for name in ("a0", "a1")]
    modules.append(json.dumps({"name": "a3", "path": a["a3"], "base_model_name": "tiny-parent"}))
    options = ENGINE_OPTIONS | LONG_RUN
    proc = ServerProcess([files["model"], *engine_flags(options), "--served-model-name", BASE, "--enable-lora",
                          "--max-loras", "2", "--max-loras-per-mix", "2", "--lora-modules", *modules,
                          "--allow-runtime-lora-updating",
                          "--api-key", KEY], files["root"] / "server.log")
    yield proc.wait_healthy()
    assert proc.stop() == 0, proc.log()[-3000:]


@pytest.fixture(scope="module")
def offline(files):
    return LLM(files["model"], **(ENGINE_OPTIONS | LONG_RUN), enable_lora=True, max_loras=2, max_cpu_loras=8)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def lora(name: str, path: str, lora_id: int) -> dict:
    return {name: LoRARequest(name, lora_id, path)}


def test_completions_and_chat_end_to_end(server, files, offline):
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(files["adapters"].items())}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    for model in (BASE, "a0", "a3"):
        expected = offline_texts(offline, loras, model, PROMPTS, temperature=0, max_tokens=10, ignore_eos=True)
        response = client.completions.create(model=model, prompt=PROMPTS, temperature=0, max_tokens=10,
                                             extra_body={"ignore_eos": True})
        assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected
    ask = dict(model="a1", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=12,
               extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    plain = client.chat.completions.create(**ask).choices[0]
    expected = offline.chat(ask["messages"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False, lora_request=loras["a1"])[0].outputs[0].text
    assert "".join(c.delta.content or "" for c in chunks) == plain.message.content == expected
    assert [c.finish_reason for c in chunks if c.finish_reason] == [plain.finish_reason] == ["length"]


def test_lora_scale_and_weighted_mixes_over_http(server, http, files, offline):
    """`lora_scale` beside `model` and an `adapters` mix through the openai client (extra_body), streamed and
    not, equal the offline engine given the same LoRARequest / LoRAMix (which test_lora_scale_mix holds to
    PEFT); bad values are 400s naming the field, and the server keeps serving."""
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(files["adapters"].items())}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    half = LoRARequest("a0", 1, loras["a0"].lora_path, lora_scale=0.5)
    mix = LoRAMix([(loras["a0"], 0.7), (loras["a1"], 0.3)])
    cases = [("a0", {"lora_scale": 0.5}, half), (BASE, {"adapters": [{"name": "a0", "weight": 0.7},
                                                                         {"name": "a1", "weight": 0.3}]}, mix),
             ("a1", {"adapters": [{"name": "a1", "weight": 0.3}, {"name": "a0", "weight": 0.7}]}, mix)]
    for model, extra, lora in cases:
        expected = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy, use_tqdm=False, lora_request=lora)]
        body = dict(model=model, prompt=PROMPTS, temperature=0, max_tokens=10, extra_body={"ignore_eos": True, **extra})
        response = client.completions.create(**body)
        assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected, extra
        assert response.model == model
        streamed = {}
        for chunk in client.completions.create(**body, stream=True):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
        assert [streamed[i] for i in range(len(PROMPTS))] == expected
        messages = [{"role": "user", "content": "hi"}]
        chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=10,
                                              extra_body={"ignore_eos": True, **extra}, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
        assert text == offline.chat(messages, greedy, use_tqdm=False, lora_request=lora)[0].outputs[0].text
    assert text != offline_texts(offline, loras, BASE, PROMPTS, temperature=0, max_tokens=10, ignore_eos=True)
    # the mix's and the scale's requests are counted under their identities
    metrics = http.get("/metrics").text
    assert metric(metrics, "loraserve_requests_total", model="a0", adapter="a0@0.5", outcome="finished") >= 3
    assert metric(metrics, "loraserve_requests_total", model=BASE, adapter="a0*0.7+a1*0.3", outcome="finished") >= 3

    def post(body: dict) -> httpx.Response:
        return http.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2} | body)

    bad = [({"adapters": [{"name": "a0", "weight": -0.5}]}, "adapters", "weights must be finite numbers in [0, 1000]"),
           ({"adapters": [{"name": "nope", "weight": 1}]}, "adapters", "'nope', which is not a served adapter"),
           ({"adapters": [{"name": "a0", "weight": 1}, {"name": "a1", "weight": 1}, {"name": "a3", "weight": 1}]},
            "adapters", "exceeds max_loras_per_mix=2; combine fewer, or restart with --max-loras-per-mix 3"),
           ({"adapters": [{"name": "a0", "weight": 1}, {"name": "a0", "weight": 1}]}, "adapters", "twice"),
           ({"adapters": []}, "adapters", "at least one"),
           ({"adapters": [{"name": "a0", "weight": "heavy"}]}, "adapters.0.weight", "valid number"),
           ({"model": "a3", "adapters": [{"name": "a0", "weight": 1}]}, "model", "which is not in adapters"),
           ({"lora_scale": -1}, "lora_scale", "finite number in [0, 1000]"),
           ({"lora_scale": 1e39}, "lora_scale", "finite number in [0, 1000]"),
           ({"adapters": [{"name": "a0", "weight": 0.1}] * 65}, "adapters", "at most 64"),
           ({"lora_scale": 0.5}, "lora_scale", "is the base model; name an adapter"),
           ({"model": "a0", "lora_scale": 0.5, "adapters": [{"name": "a0", "weight": 1}]}, "lora_scale", "weight")]
    for body, param, message in bad:
        error = assert_openai_error(post(body), 400, param)
        assert message in error["message"], (body, error)
    assert post({"model": "a0", "lora_scale": 0, "adapters": None}).status_code == 200
    assert post({"adapters": [{"name": "a1"}]}).status_code == 200  # weight 1 by default


class Stream:
    """A streamed greedy completion read in a thread, so the test can act while it runs."""

    def __init__(self, url: str, model: str, prompt: str) -> None:
        self.text, self.finish, self.chunks = "", None, 0
        self.started = threading.Event()
        body = {"model": model, "prompt": prompt, "max_tokens": LONG_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True}
        self.thread = threading.Thread(target=self._read, args=(url, body))
        self.thread.start()
        assert self.started.wait(60), "the stream did not start"

    def _read(self, url: str, body: dict) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                self.text += choice["text"]
                self.finish = choice["finish_reason"] or self.finish
                self.chunks += 1
                self.started.set()

    def result(self) -> str:
        self.thread.join(120)
        assert not self.thread.is_alive() and self.finish == "length"
        return self.text


def serve_copy(http, offline, files, source: str, name: str, lora_id: int) -> tuple:
    """Copy adapter `source` to a folder of its own, serve it as `name`, and start a long stream on it;
    returns the folder, the stream and the text the offline engine gives for the same request."""
    folder = files["root"] / name
    shutil.copytree(files["adapters"][source], folder)
    expected = offline_texts(offline, lora(name, str(folder), lora_id), name, PROMPTS[:1], temperature=0,
                             max_tokens=LONG_TOKENS, ignore_eos=True)[0]
    assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}).status_code == 200
    return folder, Stream(str(http.base_url).rstrip("/"), name, PROMPTS[0]), expected


def running(http) -> float:
    return metric(http.get("/metrics").text, "loraserve_num_requests_running")


def test_unload_while_streaming_finishes_on_the_old_weights(server, http, files, offline):
    """Deleting an adapter's folder and unloading it while a stream uses it: the stream ends with the text
    it would have had anyway; new requests get 404; the host copy is freed once the stream ends."""
    folder, stream, expected = serve_copy(http, offline, files, "a4", "leaving", 90)
    cached = metric(http.get("/metrics").text, "loraserve_lora_host_cached")
    shutil.rmtree(folder)  # gone before the unload too, so nothing may read it again
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "leaving"}).status_code == 200
    assert running(http) == 1  # still streaming
    assert_openai_error(http.post("/v1/completions", json={"model": "leaving", "prompt": "x"}), 404, "model")
    assert stream.result() == expected
    assert metric(http.get("/metrics").text, "loraserve_lora_host_cached") == cached - 1


def test_reload_in_place_while_streaming(server, http, files, offline):
    """load_inplace swaps a name to the new files at once for new requests; the running stream finishes
    on the weights it started with."""
    replacement = make_peft_adapter(files["hf"], files["root"] / "replacement", seed=99, **ADAPTERS["a2"])
    new = offline_texts(offline, lora("new", str(replacement), 92), "new", PROMPTS[:1], temperature=0,
                        max_tokens=10, ignore_eos=True)[0]
    # all the slow work is done before the stream starts: the swap below must happen while it runs
    folder, stream, old = serve_copy(http, offline, files, "a0", "swapped", 91)
    shutil.rmtree(folder)
    shutil.copytree(replacement, folder)
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "swapped", "lora_path": str(folder),
                                                        "load_inplace": True})
    assert response.status_code == 200, response.text
    assert running(http) == 1  # the old one still runs
    fresh = http.post("/v1/completions", json={"model": "swapped", "prompt": PROMPTS[0], "max_tokens": 10,
                                               "temperature": 0, "ignore_eos": True}).json()
    assert fresh["choices"][0]["text"] == new
    assert stream.result() == old and not old.startswith(new)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "swapped"}).status_code == 200


def test_disconnected_stream_frees_kv_blocks(server, http):
    before = http.get("/metrics").text
    total = metric(before, "loraserve_kv_cache_blocks")
    aborted = metric(before, "loraserve_requests_total", model="a1", adapter="a1", outcome="aborted")
    body = {"model": "a1", "prompt": "abc", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # generation has started; now hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the handler counts the abort; the step thread frees the blocks after
        text = http.get("/metrics").text
        if (metric(text, "loraserve_requests_total", model="a1", adapter="a1", outcome="aborted") > aborted
                and metric(text, "loraserve_kv_cache_free_blocks") == total):
            break
        time.sleep(0.1)
    assert metric(text, "loraserve_requests_total", model="a1", adapter="a1", outcome="aborted") == aborted + 1
    assert metric(text, "loraserve_kv_cache_free_blocks") == total
    assert metric(text, "loraserve_num_requests_running") == 0


# ---- a server without adapters: start-up checks, disabled runtime loading, graceful stop ------------


def test_bad_startup_adapter_stops_the_server(files):
    proc = ServerProcess([files["model"], *engine_flags(ENGINE_OPTIONS), "--enable-lora", "--lora-modules",
                          f"big={files['rank32']}"], files["root"] / "bad.log")
    assert proc.wait_exit(180) != 0
    # the adapter's rank, the limit and the flag to fix it: not any "32" (the dtype float32 is in the log too)
    assert ("loraserve serve: LoRA rank 32 of adapter 'big' exceeds max_lora_rank=16; restart with "
            "--max-lora-rank 32") in proc.log(), proc.log()[-3000:]


def test_plain_server_and_sigterm(files):
    """SIGTERM drains: no new connections, a stream that can finish within --shutdown-timeout does, one that
    cannot ends with an error event and [DONE] when it runs out, and the process exits 0."""
    options = ENGINE_OPTIONS | dict(max_model_len=512, num_kv_blocks=512)
    proc = ServerProcess([files["model"], *engine_flags(options), "--shutdown-timeout", "0.5"],
                         files["root"] / "plain.log").wait_healthy()
    try:
        url = proc.url
        model = files["model"]  # served under its path when --served-model-name is not given
        assert_openai_error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "."}), 404)
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "a0", "prompt": "x"}), 404, "model")
        short = {"model": model, "prompt": "x", "max_tokens": 20, "ignore_eos": True, "temperature": 0}
        long = short | {"max_tokens": 500}  # cannot finish within the half second the drain allows
        whole = httpx.post(f"{url}/v1/completions", json=short, timeout=300)  # the reference; warms up too
        assert whole.status_code == 200, whole.text
        expected = whole.json()["choices"][0]["text"]
        assert whole.json()["usage"]["completion_tokens"] == 20 and expected
        lines: dict[str, list[str]] = {"short": [], "long": []}

        def stream(name: str, body: dict) -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True},
                                  timeout=30) as response:
                    for line in response.iter_lines():
                        lines[name].append(line)
            except httpx.HTTPError:
                lines[name].append("<closed>")

        readers = [threading.Thread(target=stream, args=("long", long))]
        readers[0].start()
        while not lines["long"] and readers[0].is_alive():
            time.sleep(0.01)
        readers.append(threading.Thread(target=stream, args=("short", short)))
        readers[1].start()
        while not lines["short"] and readers[1].is_alive():
            time.sleep(0.01)
        start = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # draining: no new connections
            httpx.get(f"{url}/health", timeout=2)
        assert proc.stop(timeout=10) == 0, proc.log()[-3000:]
        assert time.monotonic() - start < 8
        for reader in readers:
            reader.join(10)
            assert not reader.is_alive()

        def chunks(name: str) -> list[dict]:
            return [json.loads(line.removeprefix("data: ")) for line in lines[name] if line.startswith("data: {")]

        assert "".join(c["choices"][0]["text"] for c in chunks("short")) == expected
        assert [line for line in lines["short"] if line][-1] == "data: [DONE]"
        long_chunks = chunks("long")
        streamed = "".join(c["choices"][0]["text"] for c in long_chunks if "choices" in c)
        assert [line for line in lines["long"] if line][-1] == "data: [DONE]", lines["long"][-3:]
        error = long_chunks[-1]["error"]
        assert "shutting down" in error["message"] and error["type"] == "server_error", error
        assert streamed and expected.startswith(streamed[:len(expected)])
    finally:
        proc.stop()
