"""Many adapters: a thousand on disk, 16 slots, 128 in host memory, requests spread over all of them.

    python benchmarks/many_adapters.py [--adapters 1000] [--num-prompts 64] [--output-len 128]

1. Throughput: the same workload with requests cycling over 8 resident r8 q/v adapters, then with each
   request naming one of `--adapters` r8 q/v adapters uniformly at random (max_loras 16, max_cpu_loras 128):
   the ratio of the two.
2. Cold load of an r16 all-linear adapter, in its two halves: disk -> host copy (runs beside the step
   thread, never inside a step) and host copy -> slot (inside the step that first needs it).
3. Stalls: inter-token latency p50 / p99 of 32 requests on 8 resident adapters, streaming through the async
   engine, alone and while a request for an adapter drawn uniformly from the 1,000 (cold: each drawn once)
   arrives every 100 ms; paired rounds (`--rounds`, both cases once per round, the p99 ratio taken within the
   round, the median printed).
"""
from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from lora_overhead import make_adapters
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts, workload_parser

LORA = dict(enable_lora=True, max_loras=16, max_cpu_loras=128, max_lora_rank=16)


def throughput(llm: LLM, prompts: list[list[int]], output_len: int, loras: list[LoRARequest]) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    return len(prompts) * output_len / (time.perf_counter() - start)


def cold_load_ms(llm: LLM, adapters: list[Path], first_id: int) -> tuple[list[float], list[float]]:
    """(disk -> host, host -> slot) milliseconds for each adapter, loaded the way a request loads it."""
    manager = llm.engine.lora_manager
    to_host, to_slot = [], []
    for i, path in enumerate(adapters):
        start = time.perf_counter()
        adapter = manager.acquire(LoRARequest(path.name, first_id + i, str(path)))
        to_host.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        manager.activate([adapter])
        to_slot.append((time.perf_counter() - start) * 1000)
        manager.release(adapter)
    return to_host, to_slot


async def stream_gaps(engine: AsyncLLMEngine, request_id: str, prompt: list[int], output_len: int,
                      lora: LoRARequest) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    gaps, last = [], None
    async for _ in engine.generate(request_id, None, prompt, params, lora):
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last) * 1000)
        last = now
    return gaps


async def itl_under_cold_loads(engine: AsyncLLMEngine, prompts: list[list[int]], output_len: int,
                               resident: list[LoRARequest], cold: list[LoRARequest]) -> list[float]:
    """ITL of requests on resident adapters while, if `cold` is given, a request for a new cold adapter
    arrives every 100 ms."""
    streams = [asyncio.create_task(stream_gaps(engine, f"res-{time.time()}-{i}", p, output_len,
                                               resident[i % len(resident)]))
               for i, p in enumerate(prompts)]
    newcomers = []
    for i, lora in enumerate(cold):
        await asyncio.sleep(0.1)
        newcomers.append(asyncio.create_task(stream_gaps(engine, f"cold-{i}", prompts[i], 4, lora)))
    gaps = [g for gs in await asyncio.gather(*streams) for g in gs]
    await asyncio.gather(*newcomers)
    return gaps


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of the stall phase")
    parser.add_argument("--stalls-only", action="store_true", help="only the stall phase")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    prompts = make_prompts(load_tokenizer(folder), args.num_prompts, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="many-adapters-"))
    start = time.perf_counter()
    small = make_adapters(folder, tmp, 8, args.adapters, seed=0, target_modules=["q_proj", "v_proj"])
    print(f"made {len(small)} r8 q/v adapters in {time.perf_counter() - start:.0f} s", flush=True)
    requests = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(small)]
    if not args.stalls_only:
        throughput_and_cold_loads(args, prompts, requests, make_adapters(folder, tmp, 16, 12, seed=5000))
    stalls(args, prompts, requests)


def throughput_and_cold_loads(args, prompts: list[list[int]], requests: list[LoRARequest], big: list[Path]) -> None:
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, **LORA)
    throughput(llm, prompts[:8], 4, requests[:8])  # warm-up
    eight = throughput(llm, prompts, args.output_len, [requests[i % 8] for i in range(len(prompts))])
    rng = random.Random(0)
    spread = [rng.choice(requests) for _ in prompts]
    many = throughput(llm, prompts, args.output_len, spread)
    print(f"8 resident r8 adapters:        {eight:7.1f} out tok/s")
    print(f"{args.adapters} adapters, uniform:     {many:7.1f} out tok/s  ({many / eight:.2f}x the 8-adapter figure; "
          f"{len({r.lora_int_id for r in spread})} distinct in {len(prompts)} requests, 16 slots)", flush=True)

    to_host, to_slot = cold_load_ms(llm, big[:12], 200_000)
    total = [a + b for a, b in zip(to_host, to_slot, strict=True)]
    print(f"cold load of an r16 all-linear adapter (median / max of {len(total)}): disk -> host "
          f"{statistics.median(to_host):.1f} / {max(to_host):.1f} ms (beside the step thread), host -> slot "
          f"{statistics.median(to_slot):.1f} / {max(to_slot):.1f} ms (inside a step); total "
          f"{statistics.median(total):.1f} / {max(total):.1f} ms", flush=True)


def stalls(args, prompts: list[list[int]], requests: list[LoRARequest]) -> None:
    engine = AsyncLLMEngine.from_config(EngineConfig.from_options(
        model=args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, **LORA))
    resident, streams, per_round = requests[:8], prompts[:32], 12
    newcomers = random.Random(1).sample(requests[8:], per_round * args.rounds)  # uniform, each cold once
    rows: dict[str, list[float]] = {"p50 alone": [], "p99 alone": [], "p50 cold": [], "p99 cold": [], "ratio": []}
    try:
        asyncio.run(itl_under_cold_loads(engine, streams[:8], 8, resident, []))  # warm: resident adapters in slots
        for r in range(args.rounds):
            quiet = asyncio.run(itl_under_cold_loads(engine, streams, args.output_len, resident, []))
            cold = newcomers[r * per_round:(r + 1) * per_round]
            busy = asyncio.run(itl_under_cold_loads(engine, streams, args.output_len, resident, cold))
            for label, gaps in (("alone", quiet), ("cold", busy)):
                rows[f"p50 {label}"].append(percentile(gaps, 50))
                rows[f"p99 {label}"].append(percentile(gaps, 99))
            rows["ratio"].append(rows["p99 cold"][-1] / rows["p99 alone"][-1])
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    finally:
        engine.shutdown()
    print(f"resident-adapter ITL (32 streams on 8 adapters; {per_round} requests for cold r8 q/v adapters 100 ms "
          f"apart; median of {args.rounds} rounds): " + ", ".join(f"{k} {statistics.median(v):.2f}"
                                                                    for k, v in rows.items()))


if __name__ == "__main__":
    main()
