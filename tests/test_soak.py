"""Soak (issue 22): many streaming clients against a real `loraserve serve` subprocess, some of them hanging
up mid-stream, while adapters are loaded, unloaded and reloaded in place, with more adapters in use than
slots and host copies. Every completed answer must equal the offline `LLM`'s on the same files (greedy, both
in float32: bf16 numerics may change with the batch's composition, fp32 on the sharp tiny model does not);
afterwards no KV block, adapter pin or client task may be left behind, and the server's resident memory
must stay flat after warm-up.

`run_soak` is the one driver: benchmarks/soak.py runs it at full size (256 clients, minutes) and records the
figures; the test below is its shortened run."""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest
from server_utils import (
    ADAPTERS,
    BASE,
    ServerProcess,
    engine_flags,
    make_server_files,
    metric,
    metric_families,
    offline_texts,
)

PROMPTS = ["The quick brown fox", "Hello, world", "Once upon a time", "abc", "To be or not to be", "1 2 3 4 5",
           "Many adapters, one base", "soak"]
# served beside make_server_files' a0-a4; every served name is reloaded in place, in turn, from its own folder
MORE_ADAPTERS = {"a5": dict(r=4, lora_alpha=4, target_modules="all-linear"),
                 "a6": dict(r=12, lora_alpha=24, target_modules=["o_proj", "up_proj"])}
# loaded under a fresh name extra-<k> and unloaded again, in turn; clients use the newest name
EXTRA_ADAPTERS = {"x0": dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
                  "x1": dict(r=2, lora_alpha=4, target_modules=["v_proj", "gate_proj"])}
SERVED = [*ADAPTERS, *MORE_ADAPTERS]
EXTRA = "extra"  # a client's pick of the churned name
ENGINE = dict(dtype="float32", max_model_len=128, block_size=4)


@dataclass(frozen=True)
class SoakSettings:
    clients: int = 256
    seconds: float = 300.0
    warmup_seconds: float = 60.0  # RSS before this is warm-up; the slope is fitted after it
    disconnect_fraction: float = 0.3
    max_tokens: int = 32
    max_loras: int = 2
    max_cpu_loras: int = 3
    num_kv_blocks: int = 1024  # fewer than 256 clients' worth: admission waits and preemptions happen too
    churn_period: float = 1.0  # seconds between two adapter updates
    sample_period: float = 3.0  # seconds between two RSS samples
    seed: int = 0


@dataclass
class Tally:
    """What the clients saw, gathered on the one event loop (no lock needed)."""

    completed: int = 0
    disconnected: int = 0
    refused: int = 0  # 404 for an extra-<k> name being unloaded: allowed
    ttft: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


@dataclass
class Churn:
    # (name, folder key) of the newest extra adapter; until the first load, and between an unload and the next
    # load, a name not served (requests for it get 404)
    current: tuple[str, str] = (f"{EXTRA}-0", next(iter(EXTRA_ADAPTERS)))
    loads: int = 0
    reloads: int = 0
    unloads: int = 0


def make_soak_files(root: Path) -> dict[str, str]:
    """The sharp tiny Llama and its adapters: folder key (BASE, a0-a6, x0, x1) -> path (BASE: the model)."""
    files = make_server_files(root)
    folders = {BASE: files["model"], **files["adapters"]}
    for i, (name, kwargs) in enumerate({**MORE_ADAPTERS, **EXTRA_ADAPTERS}.items()):
        folders[name] = str(make_peft_adapter(files["hf"], root / name, seed=50 + i, **kwargs))
    return folders


def offline_references(folders: dict[str, str], max_tokens: int) -> dict[tuple[str, str], str]:
    """(folder key, prompt) -> the offline LLM's greedy text: what every completed stream must equal."""
    offline = LLM(folders[BASE], **ENGINE, num_kv_blocks=256, enable_lora=True, max_loras=2,
                  max_cpu_loras=len(folders))
    loras = {key: LoRARequest(key, i + 1, path) for i, (key, path) in enumerate(folders.items()) if key != BASE}
    references = {}
    for key in folders:
        texts = offline_texts(offline, loras, key, PROMPTS, temperature=0, max_tokens=max_tokens, ignore_eos=True)
        references |= {(key, prompt): text for prompt, text in zip(PROMPTS, texts, strict=True)}
    return references


def run_soak(settings: SoakSettings, root: Path) -> dict:
    """Build the files in `root`, take the references offline, serve, soak; the figures, JSON-ready."""
    folders = make_soak_files(root)
    references = offline_references(folders, settings.max_tokens)
    served = [f"{name}={folders[name]}" for name in SERVED]
    server = ServerProcess([folders[BASE], *engine_flags(ENGINE | {"num_kv_blocks": settings.num_kv_blocks}),
                            "--served-model-name", BASE, "--enable-lora", "--max-loras", str(settings.max_loras),
                            "--max-cpu-loras", str(settings.max_cpu_loras), "--lora-modules", *served,
                            "--allow-runtime-lora-updating", "--log-level", "warning"], root / "server.log")
    try:
        result = asyncio.run(drive(server.wait_healthy().url, folders, references, settings))
    finally:
        exit_status = server.stop()
    return {"settings": asdict(settings), **result, "server_exit": exit_status}


async def drive(url: str, folders: dict[str, str], references: dict[tuple[str, str], str],
                settings: SoakSettings) -> dict:
    """The clients, the adapter churn and the RSS sampler side by side until the deadline; then, once the
    server is idle, what it still holds."""
    tasks_before = len(asyncio.all_tasks())
    tally, churn = Tally(), Churn()
    connections = settings.clients + 8  # every client streams at once, beside the churn and the sampler
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600, connect=60)) as http:
        before = (await http.get("/metrics")).text
        start = time.monotonic()
        deadline = start + settings.seconds
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(http, start, settings.sample_period, stop_sampling))
        updater = asyncio.create_task(churn_adapters(http, folders, churn, tally, settings.churn_period, deadline))
        await asyncio.gather(*[client(http, i, settings, references, churn, tally, deadline)
                               for i in range(settings.clients)])
        elapsed = time.monotonic() - start
        after = (await http.get("/metrics")).text
        await updater
        stop_sampling.set()
        samples = await sampler
        idle = await wait_idle(http)
    tasks_after = len(asyncio.all_tasks())
    generated = total(after, "loraserve_generation_tokens") - total(before, "loraserve_generation_tokens")
    ttft = sorted(tally.ttft)
    return {"completed": tally.completed, "disconnected": tally.disconnected, "refused": tally.refused,
            "errors": tally.errors, "mismatches": tally.mismatches, "seconds": elapsed,
            "tokens_per_s": generated / elapsed,
            "ttft_p50": statistics.median(ttft) if ttft else None,
            "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "churn": {"loads": churn.loads, "reloads": churn.reloads, "unloads": churn.unloads},
            "server_requests": outcomes(after), "preemptions": metric(after, "loraserve_num_preemptions_total"),
            "rss": rss_figures(samples, settings.warmup_seconds),
            "after": held(idle), "tasks_before": tasks_before, "tasks_after": tasks_after}


async def client(http: httpx.AsyncClient, index: int, settings: SoakSettings,
                 references: dict[tuple[str, str], str], churn: Churn, tally: Tally, deadline: float) -> None:
    """Stream completions until the deadline: a seeded random (prompt, model) each, read to the end or, for
    `disconnect_fraction` of them, hung up on after a random number of chunks."""
    rng = random.Random(settings.seed * 100_003 + index)
    models = [BASE, *SERVED, EXTRA]
    while time.monotonic() < deadline:
        prompt, model = rng.choice(PROMPTS), rng.choice(models)
        cut = rng.randint(1, settings.max_tokens - 1) if rng.random() < settings.disconnect_fraction else None
        model, key = churn.current if model == EXTRA else (model, model)
        await stream(http, model, prompt, references[key, prompt], cut, settings.max_tokens, tally)


async def stream(http: httpx.AsyncClient, model: str, prompt: str, expected: str, cut: int | None,
                 max_tokens: int, tally: Tally) -> None:
    """One streamed greedy completion, checked against `expected` (a hung-up one: its beginning)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, chunks, done, sent = "", 0, False, time.monotonic()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                reason = (await response.aread())[:300]
                if response.status_code == 404 and model.startswith(f"{EXTRA}-"):
                    tally.refused += 1
                else:
                    tally.errors.append(f"{model}: HTTP {response.status_code} {reason!r}")
                return
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    tally.errors.append(f"{model}: {chunk['error']}")
                    return
                delta = chunk["choices"][0]["text"]
                if delta:
                    if chunks == 0:
                        tally.ttft.append(time.monotonic() - sent)
                    text, chunks = text + delta, chunks + 1
                if cut is not None and chunks >= cut:
                    break  # leaving the block closes the connection: the server must abort the request
    except httpx.HTTPError as e:
        tally.errors.append(f"{model}: {e!r}")
        return
    if done:
        tally.completed += 1
        if text != expected:
            tally.mismatches.append(f"{model} {prompt!r}: {text!r} != {expected!r}")
    else:
        tally.disconnected += 1
        if not expected.startswith(text):
            tally.mismatches.append(f"{model} {prompt!r} (hung up): {text!r} is not the start of {expected!r}")


async def churn_adapters(http: httpx.AsyncClient, folders: dict[str, str], churn: Churn, tally: Tally,
                         period: float, deadline: float) -> None:
    """Until the deadline, cycles of three updates `period` apart: load an extra adapter under a fresh name,
    reload a served name in place from its same folder (so the references stay valid), unload the extra name
    (clients keep asking for it a while: their 404s are the refused requests)."""
    extras = list(EXTRA_ADAPTERS)
    k = 0
    while time.monotonic() < deadline:
        name, key = f"{EXTRA}-{k}", extras[k % len(extras)]
        churn.loads += await update(http, "load", {"lora_name": name, "lora_path": folders[key]}, tally)
        churn.current = (name, key)
        await asyncio.sleep(period)
        served = SERVED[k % len(SERVED)]
        body = {"lora_name": served, "lora_path": folders[served], "load_inplace": True}
        churn.reloads += await update(http, "load", body, tally)
        await asyncio.sleep(period)
        churn.unloads += await update(http, "unload", {"lora_name": name}, tally)
        await asyncio.sleep(period)
        k += 1


async def update(http: httpx.AsyncClient, action: str, body: dict, tally: Tally) -> bool:
    response = await http.post(f"/v1/{action}_lora_adapter", json=body)
    if response.status_code != 200:
        tally.errors.append(f"{action} {body}: HTTP {response.status_code} {response.text[:300]!r}")
    return response.status_code == 200


async def sample_rss(http: httpx.AsyncClient, start: float, period: float,
                     stop: asyncio.Event) -> list[tuple[float, float]]:
    """(seconds since start, the server's resident MiB) every `period` until `stop`."""
    samples = []
    while True:
        text = (await http.get("/metrics")).text
        samples.append((time.monotonic() - start, metric(text, "loraserve_resident_memory_bytes") / 2**20))
        try:
            await asyncio.wait_for(stop.wait(), period)
            return samples
        except TimeoutError:
            pass


async def wait_idle(http: httpx.AsyncClient, timeout: float = 60.0) -> str:
    """/metrics once nothing runs or waits and every KV block is free again (or at `timeout`): aborted
    requests' blocks are freed by the step thread after their handler has returned."""
    give_up = time.monotonic() + timeout
    while True:
        text = (await http.get("/metrics")).text
        busy = metric(text, "loraserve_num_requests_running") + metric(text, "loraserve_num_requests_waiting")
        full = metric(text, "loraserve_kv_cache_free_blocks") == metric(text, "loraserve_kv_cache_blocks")
        if (not busy and full) or time.monotonic() > give_up:
            return text
        await asyncio.sleep(0.2)


def total(text: str, family: str) -> float:
    """A counter summed over its labels."""
    return sum(s.value for s in metric_families(text).get(family, []) if s.name == f"{family}_total")


def outcomes(text: str) -> dict[str, float]:
    """The server's own count of generation requests by outcome (finished / aborted / failed)."""
    counts: dict[str, float] = {}
    for s in metric_families(text).get("loraserve_requests", []):
        if s.name == "loraserve_requests_total":
            counts[s.labels["outcome"]] = counts.get(s.labels["outcome"], 0) + s.value
    return counts


def held(text: str) -> dict:
    """What the idle server still holds. Host copies pinned by no request are the resident adapters listed
    by name; a copy pinned by a request that never let go would be counted beside them."""
    resident = sorted(s.labels["adapter_name"] for s in metric_families(text).get("vllm:lora_adapter_loaded", []))
    names = ("num_requests_running", "num_requests_waiting", "kv_cache_free_blocks", "kv_cache_blocks",
             "lora_slots_used", "lora_slots", "lora_host_cached")
    return {name: metric(text, f"loraserve_{name}") for name in names} | {"resident_adapters": resident}


def rss_figures(samples: list[tuple[float, float]], warmup_seconds: float) -> dict:
    """Resident MiB at the end of warm-up and at the end, and the least-squares slope after warm-up."""
    after = [(t, mib) for t, mib in samples if t >= warmup_seconds]
    times, mib = [t for t, _ in after], [m for _, m in after]
    slope = statistics.linear_regression(times, mib).slope * 60 if len(after) >= 2 else None
    return {"warmup_mib": after[0][1] if after else None, "end_mib": samples[-1][1],
            "slope_mib_per_min": slope, "samples": samples}


def problems(result: dict) -> list[str]:
    """The soak's checks that hold at any size: exact answers, no failures, nothing left behind."""
    found = []
    if result["errors"]:
        found.append(f"{len(result['errors'])} errors, e.g. {result['errors'][:3]}")
    if result["mismatches"]:
        found.append(f"{len(result['mismatches'])} differ from offline, e.g. {result['mismatches'][:3]}")
    after = result["after"]
    if after["num_requests_running"] or after["num_requests_waiting"]:
        found.append(f"requests still running / waiting: {after}")
    if after["kv_cache_free_blocks"] != after["kv_cache_blocks"]:
        found.append(f"KV blocks leaked: {after['kv_cache_free_blocks']} of {after['kv_cache_blocks']} free")
    if after["lora_host_cached"] != len(after["resident_adapters"]):
        found.append(f"adapter copies still pinned: {after['lora_host_cached']} in host memory, resident "
                     f"{after['resident_adapters']}")
    if any(name.startswith(f"{EXTRA}-") for name in after["resident_adapters"]):
        found.append(f"an unloaded adapter is still resident: {after['resident_adapters']}")
    if result["tasks_after"] != result["tasks_before"]:
        found.append(f"client tasks: {result['tasks_before']} before, {result['tasks_after']} after")
    if result["server_exit"] != 0:
        found.append(f"the server exited with {result['server_exit']}")
    return found


def figures(result: dict) -> str:
    """The soak's figures as printed lines."""
    s, rss, after, ttft = result["settings"], result["rss"], result["after"], (result["ttft_p50"], result["ttft_p99"])
    slope = "n/a" if rss["slope_mib_per_min"] is None else f"{rss['slope_mib_per_min']:+.2f}"
    return "\n".join([
        f"{s['clients']} clients, {result['seconds']:.0f} s, {s['disconnect_fraction']:.0%} hang up; server and "
        f"offline reference in float32 (exact greedy comparison); max_loras {s['max_loras']}, max_cpu_loras "
        f"{s['max_cpu_loras']}, {len(SERVED)} adapters + base + churned extras",
        f"requests: {result['completed']} completed, {result['disconnected']} disconnected, {result['refused']} "
        f"refused (404, unloaded name), {len(result['errors'])} errors, {len(result['mismatches'])} differing from "
        f"offline; the server counted {result['server_requests']}, {result['preemptions']:.0f} preemptions",
        f"adapter churn: {result['churn']}",
        f"{result['tokens_per_s']:.0f} tokens/s generated; TTFT p50 {ttft[0]:.3f} s, p99 {ttft[1]:.3f} s"
        if ttft[0] is not None else f"{result['tokens_per_s']:.0f} tokens/s; no first token seen",
        f"RSS: {rss['warmup_mib'] or float('nan'):.1f} MiB after {s['warmup_seconds']:.0f} s warm-up, "
        f"{rss['end_mib']:.1f} MiB at the end, slope after warm-up {slope} MiB/min ({len(rss['samples'])} samples)",
        f"after: {after['kv_cache_free_blocks']:.0f} of {after['kv_cache_blocks']:.0f} KV blocks free, "
        f"{after['num_requests_running']:.0f} running, {after['num_requests_waiting']:.0f} waiting; "
        f"{after['lora_slots_used']:.0f} of {after['lora_slots']:.0f} slots hold an adapter (kept for reuse), "
        f"{after['lora_host_cached']:.0f} host copies (resident {after['resident_adapters']}); client tasks "
        f"{result['tasks_before']} -> {result['tasks_after']}",
    ])


def test_soak_short(tmp_path):
    """64 clients for 40 s: the checks of the full soak, with counts and an RSS bound sized for it. 256 KV
    blocks, a quarter of what 64 clients could hold: hundreds of preemptions, whose recomputed answers must be
    exact too."""
    settings = SoakSettings(clients=64, seconds=40, warmup_seconds=15, num_kv_blocks=256, sample_period=2)
    result = run_soak(settings, tmp_path)
    report = figures(result)
    print(report)
    assert problems(result) == [], report
    assert result["completed"] >= 100 and result["disconnected"] >= 20, report
    assert result["churn"]["reloads"] >= 5 and result["churn"]["unloads"] >= 5 and result["preemptions"], report
    assert result["rss"]["end_mib"] - result["rss"]["warmup_mib"] < 64, report
