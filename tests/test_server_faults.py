"""A dead engine, seen from outside: a real server process whose step thread dies (a fault planted by
tests/fault_server.py) fails every open stream with an error event, answers 503 on /health and exits
non-zero so a supervisor restarts it; no answer carries the exception's text."""
from __future__ import annotations

import json
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
