"""A dead engine, seen from outside: a real server process whose step thread dies (a fault planted by
tests/fault_server.py) fails every open stream with an error event, answers 503 on /health and exits
non-zero so a supervisor restarts it; no answer carries the exception's text."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest

from server_utils import BASE, ENGINE_OPTIONS, REPO, ServerProcess, engine_flags, make_server_files

DEAD_ENGINE_EXIT_STATUS = 70
SECRET = "secret-internal-detail"  # in the planted exception's message only
TRIGGER = [7, 7, 7, 7]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_server_files(tmp_path_factory.mktemp("faults"))


def test_a_dead_engine_fails_its_streams_turns_health_503_and_exits_nonzero(files):
    options = ENGINE_OPTIONS | dict(max_model_len=512, num_kv_blocks=512)
    proc = ServerProcess([files["model"], *engine_flags(options), "--served-model-name", BASE],
                         files["root"] / "dead.log", entry=[str(REPO / "tests" / "fault_server.py")]).wait_healthy()
    try:
        lines: list[str] = []

        def stream() -> None:
            body = {"model": BASE, "prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=30) as response:
                lines.extend(response.iter_lines())

        reader = threading.Thread(target=stream)
        reader.start()
        while not lines and reader.is_alive():
            time.sleep(0.01)
        killer = httpx.post(f"{proc.url}/v1/completions", json={"model": BASE, "prompt": TRIGGER, "max_tokens": 4},
                            timeout=30)
        assert killer.status_code == 503, killer.text
        assert "generation stopped" in killer.json()["error"]["message"]
        health = httpx.get(f"{proc.url}/health", timeout=5)
        assert health.status_code == 503 and "stopped" in health.json()["error"]["message"]
        assert proc.wait_exit(30) == DEAD_ENGINE_EXIT_STATUS
        reader.join(10)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" or [line for line in lines if line][-1] == "data: [DONE]"
        assert events[-1]["error"]["type"] == "server_error"
        assert all(SECRET not in text for text in (killer.text, health.text, *lines))
        assert SECRET in proc.log()  # the operator's log has it
    finally:
        proc.stop()


def test_a_corrupt_file_swapped_under_a_loaded_name_fails_only_its_requests(files):
    """The files of a served adapter are replaced by a truncated copy after it was evicted from host memory:
    its requests get a 400 naming the file, a reload in place from them is refused (the name stays registered),
    every other request equals the offline engine, and restoring the file heals the name."""
    from fastapi.testclient import TestClient

    from loraserve import LLM, LoRARequest
    from loraserve.config import EngineConfig
    from loraserve.engine.async_engine import AsyncLLMEngine
    from loraserve.server.adapters import LoRAModule
    from loraserve.server.api import ServerSettings, build_app
    from server_utils import offline_texts

    folder = files["root"] / "swapped"
    shutil.copytree(files["adapters"]["a0"], folder)
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    options = dict(ENGINE_OPTIONS, enable_lora=True, max_loras=1, max_cpu_loras=1)
    engine = AsyncLLMEngine.from_config(EngineConfig.from_options(model=files["model"], **options))
    modules = [LoRAModule("swapped", str(folder)), LoRAModule("a1", files["adapters"]["a1"])]
    app = build_app(engine, ServerSettings([BASE], modules, allow_runtime_lora_updating=True))
    offline = LLM(files["model"], **options)
    loras = {"swapped": LoRARequest("swapped", 1, str(folder)), "a1": LoRARequest("a1", 2, files["adapters"]["a1"])}
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)
    expected = {name: offline_texts(offline, loras, name, ["Hello, world"], **greedy)[0] for name in (BASE, *loras)}
    try:
        with TestClient(app) as http:
            def answer(model: str) -> httpx.Response:
                return http.post("/v1/completions", json={"model": model, "prompt": "Hello, world"} | greedy)

            assert answer("swapped").json()["choices"][0]["text"] == expected["swapped"]
            assert answer("a1").json()["choices"][0]["text"] == expected["a1"]  # evicts swapped from host memory
            weights.write_bytes(good[: len(good) // 2])
            error = answer("swapped")
            assert error.status_code == 400 and "adapter_model.safetensors" in error.json()["error"]["message"]
            reload = http.post("/v1/load_lora_adapter", json={"lora_name": "swapped", "lora_path": str(folder),
                                                              "load_inplace": True})
            assert reload.status_code == 400 and "corrupt or truncated" in reload.json()["error"]["message"]
            for model in (BASE, "a1"):
                assert answer(model).json()["choices"][0]["text"] == expected[model]
            weights.write_bytes(good)
            assert answer("swapped").json()["choices"][0]["text"] == expected["swapped"]
            stats = asyncio.run(engine.stats())
            assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0
    finally:
        engine.shutdown()
