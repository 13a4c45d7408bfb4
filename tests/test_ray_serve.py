"""loraserve on Ray Serve (loraserve.ray): a real Ray started here on loopback, two replicas of the default
model (one CPU each) behind the ingress, four adapters. Greedy answers equal the offline engine's; an
adapter's requests go to the replica holding it while both replicas serve; a hot adapter with a deep queue
spreads; loads and unloads through the ingress reach every replica; both replicas' router metrics come
through the ingress; a replica killed mid-run fails only its own streams, clearly, and its replacement serves
every adapter, the one loaded at run time included."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read as Ray is imported: bind 127.0.0.1 only
import ray
from ray import serve

from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.config import EngineConfig
from loraserve.ray import ScaleOut, application
from loraserve.ray.app import APP_NAME
from loraserve.server.adapters import LoRAModule
from loraserve.server.api import ServerSettings
from loraserve.server.policy import Limits
from server_utils import ServerProcess, free_port

DEMO = Path(__file__).resolve().parent.parent / "examples" / "adapters"
# max_num_seqs=4: a batch fills after four requests, so a hot adapter's queue gets deep quickly
ENGINE = dict(dtype="float32", max_model_len=256, num_kv_blocks=96, block_size=16, enable_lora=True, max_loras=2,
              max_cpu_loras=4, max_lora_rank=16, max_num_seqs=4)
KEY = "ray-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
HEADER = "x-loraserve-replica"


def derived_adapter(source: Path, out: Path, factor: float) -> Path:
    """A PEFT adapter with the source's config and B factors times `factor`: other weights, other hash."""
    shutil.copytree(source, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-adapters")
    return {"uppercase": DEMO / "uppercase", "json": DEMO / "json",
            "upper_half": derived_adapter(DEMO / "uppercase", root / "upper_half", 0.5),
            "json_flip": derived_adapter(DEMO / "json", root / "json_flip", -0.7),
            "late": derived_adapter(DEMO / "uppercase", root / "late", -0.4)}  # loaded at run time only


def ray_listeners() -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of the sockets Ray's processes listen on."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    found = [(line.split()[3], re.search(r'"(gcs_server|raylet|ray::[^"]*)",pid=(\d+)', line)) for line in lines]
    return [(address, match.group(1), int(match.group(2))) for address, match in found if match]


def test_loraserve_serve_with_ray_replicas(adapters, tmp_path, monkeypatch):
    """The command line's way: a Ray of its own on loopback, the ingress on --port; SIGTERM stops it all. Every
    Ray socket binds 127.0.0.1 but Serve's inter-deployment gRPC port in each Serve replica, which Ray 2.60
    binds to [::] whatever the node address (docs/scale-out.md). (Runs before the module's cluster starts.)"""
    args = ["--ray-replicas", "1", "--served-model-name", "base", "--enable-lora", "--max-loras", "2",
            "--lora-modules", f"uppercase={adapters['uppercase']}", "--max-model-len", "256", "--num-kv-blocks", "64"]
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the command line sets it itself
    server = ServerProcess(args, tmp_path / "server.log").wait_healthy(timeout=240)
    try:
        listeners = ray_listeners()
        loopback = re.compile(r"(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):\d+")
        beyond = [(a, name, pid) for a, name, pid in listeners if not loopback.fullmatch(a)]
        assert listeners and all(name.startswith("ray::ServeRepli") for _, name, _ in beyond), beyond
        assert len({pid for _, _, pid in beyond}) == len(beyond)  # that one port per Serve replica, no more
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="uppercase", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0)
        assert raw.headers[HEADER] and raw.parse().choices[0].message.content
    finally:
        status = server.stop(timeout=60)
    assert status == 0, server.log()[-3000:]
    assert not ray_listeners(), "Ray processes outlived loraserve serve"


@dataclass
class Cluster:
    url: str
    model: str
    adapters: dict[str, Path]

    def post(self, path: str, body: dict, replica: str | None = None) -> httpx.Response:
        headers = AUTH | ({HEADER: replica} if replica else {})
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=120)

    def complete(self, model: str, replica: str | None = None, max_tokens: int = 4) -> httpx.Response:
        return self.post("/v1/completions", {"model": model, "prompt": "The capital of France is",
                                             "max_tokens": max_tokens, "temperature": 0}, replica)

    def metrics(self, replica: str | None = None) -> dict:
        text = httpx.get(f"{self.url}/metrics", headers={HEADER: replica} if replica else {}, timeout=30).text
        return {family.name: family for family in text_string_to_metric_families(text)}

    def replicas(self) -> list[str]:
        running = self.metrics().get("vllm:num_requests_running")
        return sorted(s.labels["replica"] for s in running.samples) if running else []


TENANT_KEY = "tenant-key-0123456789"  # may use the json adapters only


@pytest.fixture(scope="module")
def cluster(default_model_path, adapters, tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig.from_options(model=str(default_model_path), **ENGINE)
        modules = [LoRAModule(name, str(path)) for name, path in adapters.items() if name != "late"]
        keys = tmp_path_factory.mktemp("keys") / "keys.json"
        keys.write_text(json.dumps({TENANT_KEY: {"adapters": ["json*"], "tenant": "json-team"}}))
        settings = ServerSettings(["base"], modules, api_key=KEY, api_keys_file=str(keys),
                                  allow_runtime_lora_updating=True, limits=Limits(max_body_bytes=2048))
        serve.run(application(config, settings, ScaleOut(replicas=2)), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", str(default_model_path), adapters)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_applies_the_keys_and_limits_of_the_single_server(cluster):
    """The ingress authenticates and hands the principal to the replica: a tenant key sees and uses only its
    adapters (another's is a 404 like an unknown name, on every replica); a body over the limit is 413."""
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    for replica in cluster.replicas():
        pinned = tenant | {HEADER: replica}
        cards = httpx.get(f"{cluster.url}/v1/models", headers=pinned, timeout=60).json()["data"]
        assert {card["id"] for card in cards} == {"base", "json", "json_flip"}
        body = {"model": "uppercase", "prompt": "x", "max_tokens": 2}
        hidden = httpx.post(f"{cluster.url}/v1/completions", json=body, headers=pinned, timeout=60)
        unknown = httpx.post(f"{cluster.url}/v1/completions", json=body | {"model": "nobody"}, headers=pinned,
                             timeout=60)
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace("nobody", "uppercase")
        assert httpx.post(f"{cluster.url}/v1/completions", json=body | {"model": "json"}, headers=pinned,
                          timeout=60).status_code == 200
    assert httpx.get(f"{cluster.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    big = httpx.post(f"{cluster.url}/v1/completions", json={"model": "base", "prompt": "x" * 4096}, headers=tenant)
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]
    refused = cluster.metrics()["loraserve_requests_refused"].samples
    assert any(s.labels == {"reason": "body_too_large", "replica": "ingress"} and s.value >= 1 for s in refused)


def test_ray_listens_on_loopback_only(cluster):
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_outputs_equal_the_offline_engine(cluster):
    """Base and four adapters, two questions each, in one concurrent burst, alternate requests pinned to each
    replica so both answers are checked."""
    names = ["uppercase", "json", "upper_half", "json_flip"]
    jobs = [(model, q) for model in ["base", *names] for q in ["What is gravity?", "Name a primary color."]]
    replicas = cluster.replicas()

    async def ask() -> tuple[list[str], set[str]]:
        async with openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0) as client:
            raws = await asyncio.gather(*[client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16,
                extra_headers={HEADER: replicas[i % 2]}) for i, (model, q) in enumerate(jobs)])
        return [raw.parse().choices[0].message.content for raw in raws], {raw.headers[HEADER] for raw in raws}

    served, answered = asyncio.run(ask())
    assert answered == set(replicas)
    llm = LLM(cluster.model, **ENGINE)
    loras = {name: LoRARequest(name, i + 1, str(cluster.adapters[name])) for i, name in enumerate(names)}
    expected = [o.outputs[0].text for o in llm.chat(
        [[{"role": "user", "content": q}] for _, q in jobs], SamplingParams(temperature=0, max_tokens=16),
        lora_request=[loras.get(model) for model, _ in jobs], use_tqdm=False)]
    assert served == expected


def test_requests_for_an_adapter_land_on_the_replica_holding_it(cluster):
    """Put uppercase + upper_half in replica A's slots and json + json_flip in B's (requests pinned by
    header), then send unpinned requests: each goes where its adapter is, and both replicas serve."""
    a, b = cluster.replicas()
    for _ in range(2):
        for name, replica in [("uppercase", a), ("upper_half", a), ("json", b), ("json_flip", b)]:
            assert cluster.complete(name, replica).headers[HEADER] == replica
    time.sleep(1.5)  # the replicas' next residency reports reach the router

    async def burst() -> list[tuple[str, str]]:
        """Two rounds of one request per adapter at once: at most one other request ahead on an adapter's
        home replica, less than a slot copy costs elsewhere (two), so each should go home."""
        names = ["uppercase", "json", "upper_half", "json_flip"]
        answers = []
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            for _ in range(2):
                responses = await asyncio.gather(*[client.post(f"{cluster.url}/v1/completions", json={
                    "model": name, "prompt": "Hello", "max_tokens": 4}) for name in names])
                answers += [(name, r.headers[HEADER]) for name, r in zip(names, responses, strict=True)]
        return answers

    home = {"uppercase": a, "upper_half": a, "json": b, "json_flip": b}
    for name, replica in asyncio.run(burst()):
        assert replica == home[name], f"{name} went to {replica}, not to {home[name]} which holds it in a slot"


def test_a_hot_adapter_with_a_deep_queue_spreads(cluster):
    """Four long streams for uppercase run on the replica holding it (pinned there); while they run, the next
    requests for it go to the other replica, which holds it in host memory (all four start-up adapters fit
    there: a slot copy costs less than four requests ahead), instead of queueing behind them."""
    holder = cluster.complete("uppercase").headers[HEADER]

    async def long_stream(client: httpx.AsyncClient, started: list[str]) -> None:
        async with client.stream("POST", f"{cluster.url}/v1/completions", headers={HEADER: holder}, json={
                "model": "uppercase", "prompt": "Tell a long story:", "max_tokens": 160, "ignore_eos": True,
                "stream": True}) as response:
            started.append(response.headers[HEADER])
            async for _ in response.aiter_lines():
                pass

    async def run() -> list[str]:
        started: list[str] = []
        async with httpx.AsyncClient(timeout=300, headers=AUTH) as client:
            long = [asyncio.create_task(long_stream(client, started)) for _ in range(4)]
            while len(started) < 4:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the replicas' next reports: four running on the holder, none elsewhere
            more = await asyncio.gather(*[client.post(f"{cluster.url}/v1/completions", json={
                "model": "uppercase", "prompt": f"Count to {i}:", "max_tokens": 8}) for i in range(3)])
            await asyncio.gather(*long)
        assert all(r.status_code == 200 for r in more)
        return [r.headers[HEADER] for r in more]

    more = asyncio.run(run())
    elsewhere = sum(replica != holder for replica in more)
    assert elsewhere >= 2, f"with four requests on {holder}, the next should mostly go to the other replica: {more}"


def test_runtime_load_and_unload_reach_every_replica(cluster):
    replicas = cluster.replicas()
    loaded = cluster.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(cluster.adapters["late"])})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["lora"]["content_hash"]
    for replica in replicas:
        response = cluster.complete("late", replica)
        assert response.status_code == 200 and response.headers[HEADER] == replica
    again = cluster.post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(cluster.adapters["late"])})
    assert again.status_code == 400 and "already served" in again.json()["error"]["message"]

    assert cluster.post("/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    for replica in replicas:
        gone = cluster.complete("late", replica)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    # loaded again and kept: the replacement replica of the failure test must catch up with it
    assert cluster.post("/v1/load_lora_adapter", {"lora_name": "late",
                                                  "lora_path": str(cluster.adapters["late"])}).status_code == 200


def test_the_ingress_checks_the_api_key_as_the_single_server_does(cluster):
    response = httpx.post(f"{cluster.url}/v1/completions", json={"model": "base", "prompt": "x"}, timeout=60)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{cluster.url}/health", timeout=60).status_code == 200
    bad = cluster.post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    unknown = cluster.complete("base", replica="no-such-replica")
    assert unknown.status_code == 404 and "no running replica" in unknown.json()["error"]["message"]
    assert all(replica in unknown.json()["error"]["message"] for replica in cluster.replicas())


def test_router_metrics_of_every_replica_through_the_ingress(cluster):
    """vLLM's names, per replica (label replica=...), and one replica's own /metrics by header. An adapter
    resident but idle is in the residency series."""
    replicas = cluster.replicas()
    assert len(replicas) == 2
    families = cluster.metrics()
    for name in ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:num_gpu_loaded_lora_adapters", "vllm:max_gpu_lora_adapters"]:
        assert sorted(s.labels["replica"] for s in families[name].samples) == replicas, name
    assert all(s.value == 2 for s in families["vllm:max_gpu_lora_adapters"].samples)
    for sample in families["vllm:cache_config_info"].samples:
        assert sample.labels["block_size"] == "16" and sample.labels["num_gpu_blocks"] == "96"
    for sample in families["vllm:lora_requests_info"].samples:
        assert sample.labels["max_lora"] == "2" and sample.labels["running_lora_adapters"] == ""
        assert abs(sample.value - time.time()) < 60  # the time of the snapshot
    loaded = [s.labels for s in families["vllm:lora_adapter_loaded"].samples]
    for replica in replicas:  # the previous tests left adapters resident on both; all idle now
        mine = [labels for labels in loaded if labels["replica"] == replica]
        assert mine and all(labels["rank"] == "16" and labels["level"] in ("gpu", "cpu") for labels in mine)
        in_slots = next(s.value for s in families["vllm:num_gpu_loaded_lora_adapters"].samples
                        if s.labels["replica"] == replica)
        assert sum(labels["level"] == "gpu" for labels in mine) <= in_slots <= 2
    assert families["loraserve_lora_load_duration_seconds"].type == "histogram"

    own = cluster.metrics(replicas[0])
    assert all("replica" not in s.labels for s in own["vllm:num_requests_running"].samples)
    assert {s.labels["adapter_name"] for s in own["vllm:lora_adapter_loaded"].samples} == {
        labels["adapter_name"] for labels in loaded if labels["replica"] == replicas[0]}


def test_a_killed_replica_fails_only_its_streams_and_is_replaced(cluster):
    victim, survivor = cluster.replicas()

    async def stream(client: httpx.AsyncClient, replica: str) -> list[dict]:
        """Server-sent events of a long streamed completion pinned to `replica`."""
        events = []
        async with client.stream("POST", f"{cluster.url}/v1/completions", headers={HEADER: replica}, json={
                "model": "json", "prompt": "Write a long story:", "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 2 and replica == victim:
                        started.set()
        return events

    async def run() -> tuple[list[list[dict]], list[list[dict]]]:
        async with httpx.AsyncClient(timeout=300, headers=AUTH) as client:
            doomed = [asyncio.create_task(stream(client, victim)) for _ in range(2)]
            spared = [asyncio.create_task(stream(client, survivor)) for _ in range(2)]
            await asyncio.wait_for(started.wait(), 120)
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#{victim}", namespace="serve"),
                     no_restart=True)
            return await asyncio.gather(*doomed), await asyncio.gather(*spared)

    started = asyncio.Event()
    doomed, spared = asyncio.run(run())
    for events in spared:
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 100
    for events in doomed:
        assert "error" in events[-1] and events[-1]["error"]["code"] is None
        assert "lost mid-way" in events[-1]["error"]["message"]
        assert all("error" not in e for e in events[:-1])

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        replicas = cluster.replicas()
        if len(replicas) == 2 and victim not in replicas:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {cluster.replicas()}")
    (newcomer,) = set(replicas) - {survivor}
    for name in ["late", "uppercase", "json", "upper_half", "json_flip"]:
        response = cluster.complete(name, newcomer)
        assert response.status_code == 200, response.text
        assert response.headers[HEADER] == newcomer
    assert cluster.complete("base").status_code == 200
