"""Start `loraserve serve` as a real subprocess on a free loopback port, for the server tests; helpers the
in-process and subprocess server tests share."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m loraserve.cli serve *args --port P`; output goes to `log_path` (a pipe could fill up)."""

    def __init__(self, args: list[str], log_path: Path, entry: list[str] | None = None) -> None:
        """`entry`: what runs instead of `-m loraserve.cli` (a script that plants a fault, then runs the CLI)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("LORASERVE_API_KEY", None)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *(entry or ["-m", "loraserve.cli"]), "serve", *args, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def wait_healthy(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; kill only if it does not exit in time. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# ---- shared by the in-process and subprocess server tests ---------------------------------------------

KEY = "test-key"
BASE = "tiny"
# name -> LoraConfig kwargs; a3 is registered with the JSON form, a4 only at run time
ADAPTERS = {
    "a0": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    "a2": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "a3": dict(r=16, lora_alpha=16, target_modules=["v_proj", "down_proj"]),
    "a4": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"]),
}
ENGINE_OPTIONS = dict(dtype="float32", max_model_len=128, num_kv_blocks=256, block_size=4)


def engine_flags(options: dict) -> list[str]:
    """ENGINE_OPTIONS as `loraserve serve` flags."""
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def make_server_files(root: Path) -> dict:
    """A sharp tiny Llama and PEFT adapters for it (ADAPTERS, plus one of rank 32)."""
    import torch
    import transformers

    from lora_fixtures import make_peft_adapter
    from tiny_models import make_sharp_tiny_model

    model_path = make_sharp_tiny_model("llama", root / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    adapters = {name: str(make_peft_adapter(model, root / name, seed=i + 1, **kwargs))
                for i, (name, kwargs) in enumerate(ADAPTERS.items())}
    too_big = make_peft_adapter(model, root / "rank32", r=32, target_modules=["q_proj"])
    return {"root": root, "model": str(model_path), "hf": model, "adapters": adapters, "rank32": str(too_big)}


def offline_texts(offline, lora_requests: dict, model: str, prompts: list, **params) -> list[str]:
    """What the offline LLM answers, the reference for every generation through the server."""
    from loraserve import SamplingParams

    lora = None if model == BASE else lora_requests[model]
    outputs = offline.generate(prompts, SamplingParams(**params), use_tqdm=False, lora_request=lora)
    return [c.text for o in outputs for c in o.outputs]


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    import re

    label = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # Prometheus writes them sorted
    pattern = rf"^{re.escape(name)}{re.escape('{' + label + '}') if label else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def metric_families(text: str) -> dict[str, list]:
    """Prometheus text parsed as a scraper would: family name -> its samples (a counter's family drops
    `_total`, its samples keep it; a histogram's samples are `_bucket`, `_count`, `_sum`)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(families: dict[str, list], family: str, name: str | None = None, **labels) -> float:
    """The value of the one sample `name` (default: the family's name) with exactly `labels`."""
    [value] = [s.value for s in families[family] if s.name == (name or family) and s.labels == labels]
    return value


async def scrape_during_stream(app, body: dict, path: str = "/v1/completions") -> tuple[str, bool]:
    """POST a streamed request straight through the ASGI interface, scrape /metrics once its first chunk has
    arrived, then let it finish: (the scrape's text, whether the stream was still open when the scrape
    returned). Not through a test client: those hand a response over only once it is complete."""
    first, finished = asyncio.Event(), asyncio.Event()
    statuses: list[int] = []
    received = False

    async def receive() -> dict:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await finished.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message["type"] == "http.response.body" and message.get("body"):
            first.set()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            finished.set()

    headers = [(b"host", b"testserver"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {KEY}".encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    stream = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(first.wait(), 60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        text = (await client.get("/metrics")).text
    still_open = not finished.is_set()
    await stream
    assert statuses == [200], statuses
    return text, still_open


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error
