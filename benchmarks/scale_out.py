"""Scale-out on Ray Serve: 1 vs 2 replicas of the default model, 32 adapters, three routers.

    python benchmarks/scale_out.py [--adapters 32] [--rate 6] [--duration 30] [--rounds 5]

Four applications run side by side on one local Ray (each replica one engine thread, OMP_NUM_THREADS=1):
one replica; two replicas with loraserve's adapter-aware router; two with Serve's default multiplexed-model
routing (power of two choices, replicas reporting their adapters through @serve.multiplexed with the size
of their host cache); two with round-robin. Each replica has --max-loras slots and --max-cpu-loras host
copies, fewer than --adapters, so where a request lands decides whether its adapter is read from disk.

The load: requests arriving as a Poisson process at --rate per second for --duration seconds, each naming
one of the adapters drawn from a Zipf law (a few hot adapters, a long tail), a short prompt, --output-len
tokens streamed. Every case sees the same arrivals within a round (paired rounds, cases in a shuffled order;
the ratios are taken within a round, the median over rounds printed). Per case: output tokens/s over the
run, time to first token p50 / p99 (from sending the request to the first streamed token, as the client
sees it) and cold loads (adapters read from disk: the replicas' loraserve_lora_host_cache_events{event=load}).
Writes benchmarks/results/NAME.json and docs/img/NAME.png (--name, default scale_out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read as Ray is imported: loopback only
import httpx
import matplotlib
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from lora_overhead import make_adapters
from loraserve.config import EngineConfig
from loraserve.model.loader import resolve_model
from loraserve.ray import ScaleOut, application
from loraserve.server.adapters import LoRAModule
from loraserve.server.api import ServerSettings

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
CASES = {"1 replica": ScaleOut(1), "2, adapter-aware": ScaleOut(2, routing="adapter-aware"),
         "2, Serve multiplex": ScaleOut(2, routing="multiplex"), "2, round-robin": ScaleOut(2, routing="round-robin")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arrivals(rate: float, duration: float, adapters: int, zipf: float, seed: int) -> list[tuple[float, int]]:
    """(send time, adapter index) of a Poisson process with Zipf-distributed adapters."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(adapters)]
    order = rng.sample(range(adapters), adapters)  # which adapters are hot differs per round
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append((t, order[rng.choices(range(adapters), weights)[0]]))
        t += rng.expovariate(rate)
    return out


def cold_loads(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "loraserve_lora_host_cache_events":
            return sum(s.value for s in family.samples if s.labels.get("event") == "load" and s.name.endswith("_total"))
    return 0.0


async def one(client: httpx.AsyncClient, url: str, at: float, start: float, model: str, output_len: int) -> tuple:
    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    sent = time.monotonic()
    first, tokens = None, 0
    body = {"model": model, "prompt": "Write a short note about the weather today.", "max_tokens": output_len,
            "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk["choices"][0]["text"]:
                    first = first or time.monotonic()
                    tokens += 1
    return first - sent, tokens, time.monotonic()


async def run_case(url: str, names: list[str], load: list[tuple[float, int]], output_len: int) -> dict:
    before = cold_loads(url)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        start = time.monotonic()
        results = await asyncio.gather(*[one(client, url, at, start, names[i], output_len) for at, i in load])
    ttft = sorted(r[0] for r in results)
    wall = max(r[2] for r in results) - start
    return {"tokens_per_s": sum(r[1] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "cold_loads": cold_loads(url) - before,
            "requests": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=0.8, help="exponent of the adapters' popularity")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--name", default="scale_out", help="results/NAME.json and docs/img/NAME.png")
    args = parser.parse_args()

    folder = resolve_model(None)
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    paths = make_adapters(folder, tmp, rank=16, count=args.adapters, seed=100)
    names = [f"a{i}" for i in range(args.adapters)]
    config = EngineConfig.from_options(model=str(folder), enable_lora=True, max_loras=args.max_loras,
                                       max_cpu_loras=args.max_cpu_loras, max_lora_rank=16)
    settings = ServerSettings(["base"], [LoRAModule(n, str(p)) for n, p in zip(names, paths, strict=True)])
    replicas = sum(case.replicas for case in CASES.values())
    ray.init(num_cpus=replicas, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for i, (label, scale) in enumerate(CASES.items()):
        serve.run(application(config, settings, scale), name=f"case{i}", route_prefix=f"/case{i}")
        urls[label] = f"http://127.0.0.1:{port}/case{i}"
    print(f"{args.adapters} adapters (r16, all linear), {args.max_loras} slots and {args.max_cpu_loras} host copies "
          f"per replica; {args.rate:g} req/s for {args.duration:g} s, {args.output_len} tokens each")

    warm = arrivals(args.rate, 10.0, args.adapters, args.zipf, seed=0)
    for url in urls.values():
        asyncio.run(run_case(url, names, warm, args.output_len))
    rounds = []
    for r in range(args.rounds):
        load = arrivals(args.rate, args.duration, args.adapters, args.zipf, seed=r + 1)
        order = random.Random(r).sample(list(CASES), len(CASES))
        rounds.append({label: asyncio.run(run_case(urls[label], names, load, args.output_len)) for label in order})
        row = rounds[-1]
        print(f"round {r + 1}: " + "; ".join(
            f"{label}: {m['tokens_per_s']:.0f} tok/s, TTFT p50 {m['ttft_p50'] * 1e3:.0f} / p99 "
            f"{m['ttft_p99'] * 1e3:.0f} ms, {m['cold_loads']:.0f} cold" for label, m in row.items()), flush=True)
    serve.shutdown()
    ray.shutdown()
    report(rounds, args)


def report(rounds: list[dict], args: argparse.Namespace) -> None:
    def median(label: str, key: str) -> float:
        return statistics.median(row[label][key] for row in rounds)

    def ratio(a: str, b: str, key: str) -> float:
        return statistics.median(row[a][key] / max(row[b][key], 1e-9) for row in rounds)

    aware, default, rr, single = "2, adapter-aware", "2, Serve multiplex", "2, round-robin", "1 replica"
    print(f"\nmedians over {len(rounds)} rounds:")
    print(f"{'case':22s} {'tok/s':>7s} {'TTFT p50 ms':>12s} {'TTFT p99 ms':>12s} {'cold loads':>11s}")
    for label in CASES:
        print(f"{label:22s} {median(label, 'tokens_per_s'):7.0f} {median(label, 'ttft_p50') * 1e3:12.0f} "
              f"{median(label, 'ttft_p99') * 1e3:12.0f} {median(label, 'cold_loads'):11.0f}")
    print("\nratios within a round (median):")
    print(f"  throughput, 2 adapter-aware / 1 replica: {ratio(aware, single, 'tokens_per_s'):.2f}x")
    print(f"  cold loads, round-robin / adapter-aware: {ratio(rr, aware, 'cold_loads'):.1f}x")
    print(f"  cold loads, Serve multiplex / adapter-aware: {ratio(default, aware, 'cold_loads'):.1f}x")
    print(f"  TTFT p99, Serve multiplex / adapter-aware: {ratio(default, aware, 'ttft_p99'):.2f}x")
    print(f"  TTFT p99, round-robin / adapter-aware: {ratio(rr, aware, 'ttft_p99'):.2f}x")
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))
    plot(rounds, args)


def plot(rounds: list[dict], args: argparse.Namespace) -> None:
    labels = list(CASES)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title, scale) in zip(axes, [("ttft_p99", "TTFT p99 (ms)", 1e3), ("ttft_p50", "TTFT p50 (ms)", 1e3),
                                              ("cold_loads", "cold loads per run", 1)], strict=True):
        values = [[row[label][key] * scale for row in rounds] for label in labels]
        ax.bar(range(len(labels)), [statistics.median(v) for v in values], color=["#888", "#2a7", "#c72", "#37c"])
        for i, v in enumerate(values):
            ax.plot([i] * len(v), v, "k.", markersize=4)
        ax.set_xticks(range(len(labels)), [label.replace(", ", "\n") for label in labels], fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"Ray Serve scale-out, {args.adapters} adapters (Zipf {args.zipf:g}), {args.rate:g} req/s: median "
                 f"of {len(rounds)} paired rounds (dots: each round)")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / f"{args.name}.png", dpi=110)


if __name__ == "__main__":
    main()
