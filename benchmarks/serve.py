"""Load generator for the HTTP server: a concurrency sweep over adapter mixes, measured as clients see it.

    python benchmarks/serve.py [--model M] [--scenarios base 8 32] [--concurrency 1 4 16 64]
    python benchmarks/serve.py --url http://127.0.0.1:8000 --models base-name adapter-a adapter-b

Scenarios (each starts its own `loraserve serve` subprocess, stopped afterwards): `base`, requests to the
base model only; `8`, eight adapters with --max-loras 8; `32`, thirty-two adapters with --max-loras 8, so
adapters take turns in the slots. Adapters are random all-linear r16 PEFT adapters of the model, made in a
temp folder. Requests go round-robin over the scenario's models. Each concurrency level runs
`--requests-per-level` streaming completions with `ignore_eos`, so every request generates exactly
--output-len tokens. Prints output tokens/s, requests/s, TTFT p50/p99 and inter-token latency p50/p99.
With --url, one sweep runs against an already running server over the --models given.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lora_overhead import make_adapters
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts

SCENARIOS = {"base": (0, None), "8": (8, 8), "32": (32, 8)}  # name -> (adapters, --max-loras)


@dataclass
class RequestResult:
    ttft: float
    gaps: list[float] = field(default_factory=list)  # between consecutive streamed chunks with tokens
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, result = None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']['message']}")
            now = time.perf_counter()
            if chunk["choices"]:
                if result is None:
                    result = RequestResult(ttft=now - start)
                else:
                    result.gaps.append(now - last)
                last = now
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def sweep_level(url: str, models: list[str], prompts: list[list[int]], concurrency: int, count: int,
                      output_len: int) -> dict:
    jobs = asyncio.Queue()
    for i in range(count):
        jobs.put_nowait((models[i % len(models)], prompts[i % len(prompts)]))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency)
    key = os.environ.get("LORASERVE_API_KEY")  # the started server reads it too
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits, headers=headers) as c:
        async def worker() -> None:
            while not jobs.empty():
                model, prompt = jobs.get_nowait()
                results.append(await one_request(c, model, prompt, output_len))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    ttfts = [r.ttft for r in results]
    gaps = [g for r in results for g in r.gaps]
    return {"concurrency": concurrency, "requests": len(results), "req_s": len(results) / elapsed,
            "tok_s": sum(r.tokens for r in results) / elapsed,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50) if gaps else float("nan"),
            "itl_p99": percentile(gaps, 99) if gaps else float("nan")}


def print_row(scenario: str, row: dict) -> None:
    print(f"{scenario:>8} {row['concurrency']:>5} {row['requests']:>5} {row['req_s']:>8.2f} {row['tok_s']:>9.1f} "
          f"{row['ttft_p50'] * 1e3:>9.0f} {row['ttft_p99'] * 1e3:>9.0f} {row['itl_p50'] * 1e3:>8.1f} "
          f"{row['itl_p99'] * 1e3:>8.1f}", flush=True)


def start_server(args: argparse.Namespace, adapters: list[Path], max_loras: int | None, port: int,
                 log: Path) -> subprocess.Popen:
    model = [args.model] if args.model else []  # no MODEL: the default model, converted from its PyPI wheel
    command = [sys.executable, "-m", "loraserve.cli", "serve", *model, "--port", str(port),
               "--dtype", args.dtype, "--served-model-name", "base", "--max-num-seqs", str(max(args.concurrency)),
               *args.server_args]
    if adapters:
        command += ["--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(len(adapters)),
                    "--max-lora-rank", str(args.lora_rank),
                    "--lora-modules", *[f"lora{i}={path}" for i, path in enumerate(adapters)]]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the server did not become healthy; see {log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep(label: str, url: str, models: list[str], prompts: list[list[int]], args: argparse.Namespace) -> None:
    asyncio.run(sweep_level(url, models, prompts, 2, 4, 4))  # warm-up: first-use costs stay out of the numbers
    for concurrency in args.concurrency:
        count = args.requests_per_level or max(2 * concurrency, len(models), 8)
        print_row(label, asyncio.run(sweep_level(url, models, prompts, concurrency, count, args.output_len)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-level", type=int, default=None,
                        help="default: 2 x concurrency, at least 8 and one per model")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="further `loraserve serve` flags (last on the line), e.g. --max-model-len 1024")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--models", nargs="+", default=None, help="with --url: model names to mix")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    prompts = make_prompts(load_tokenizer(folder), 256, seed=0)
    print(f"{'scenario':>8} {'conc':>5} {'reqs':>5} {'req/s':>8} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}   (latencies in ms)")
    if args.url:
        if not args.models:
            parser.error("--url needs --models")
        run_sweep("url", args.url, args.models, prompts, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        needed = max(SCENARIOS[scenario][0] for scenario in args.scenarios)  # shared: 32 includes the 8
        made = make_adapters(folder, Path(tmp), args.lora_rank, needed, seed=0) if needed else []
        for scenario in args.scenarios:
            num_adapters, max_loras = SCENARIOS[scenario]
            port = free_port()
            server = start_server(args, made[:num_adapters], max_loras, port, Path(tmp) / f"{scenario}.log")
            try:
                models = [f"lora{i}" for i in range(num_adapters)] or ["base"]
                run_sweep(scenario, f"http://127.0.0.1:{port}", models, prompts, args)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(30)


if __name__ == "__main__":
    main()
