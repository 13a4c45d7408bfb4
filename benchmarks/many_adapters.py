"""Many adapters: a thousand on disk, 16 slots (`--max-loras`), 128 in host memory, requests spread over all of them.

    python benchmarks/many_adapters.py [--adapters 1000] [--num-prompts 64] [--output-len 128]

1. Throughput: the same workload with requests cycling over 8 resident r8 q/v adapters, and with each
   request naming one of `--adapters` r8 q/v adapters uniformly at random (`--max-loras` slots, default 16;
   max_cpu_loras 128): the ratio of the two, in paired rounds.
2. Cold load of an r16 all-linear adapter, in its two halves: disk -> host copy (runs beside the step
   thread, never inside a step) and host copy -> slot (inside the step that first needs it).
3. Stalls: inter-token latency p50 / p99 of 32 requests on 8 resident adapters, streaming through the async
   engine, once they all decode: alone; while a request on one of those resident adapters arrives every
   100 ms; while a request on an adapter drawn uniformly from the 1,000 (cold: each drawn once) arrives every
   100 ms. Paired rounds (`--rounds`, every case once per round, the p99 ratios taken within the round, the
   median printed): cold/warm is what cold loads cost, warm/alone what prefilling newcomers costs.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import tempfile
import time
from pathlib import Path

from lora_overhead import make_adapters
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.engine import LLMEngine
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts, workload_parser

LORA = dict(enable_lora=True, max_cpu_loras=128, max_lora_rank=16)


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


async def stream_times(engine: AsyncLLMEngine, request_id: str, prompt: list[int], output_len: int,
                       lora: LoRARequest, started: asyncio.Semaphore | None = None) -> list[float]:
    """When each of a stream's outputs arrived; `started` is released at its first."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    times = []
    async for _ in engine.generate(request_id, None, prompt, params, lora):
        times.append(time.perf_counter())
        if len(times) == 1 and started is not None:
            started.release()
    return times


async def itl_with_newcomers(engine: AsyncLLMEngine, prompts: list[list[int]], output_len: int,
                             resident: list[LoRARequest],
                             newcomers: list[tuple[LoRARequest, list[int]]]) -> list[float]:
    """Gaps (ms) between the outputs of streams on resident adapters, counted once every stream decodes,
    while each of `newcomers` (adapter, prompt) arrives, 100 ms apart (its prompt is prefilled beside the
    streams' decode)."""
    started = asyncio.Semaphore(0)
    streams = [asyncio.create_task(stream_times(engine, f"res-{time.time()}-{i}", p, output_len,
                                                resident[i % len(resident)], started))
               for i, p in enumerate(prompts)]
    for _ in streams:
        await started.acquire()
    decoding = time.perf_counter()
    arrivals = []
    for i, (lora, prompt) in enumerate(newcomers):
        await asyncio.sleep(0.1)
        arrivals.append(asyncio.create_task(stream_times(engine, f"new-{time.time()}-{i}", prompt, 4, lora)))
    gaps = [(b - a) * 1000 for times in await asyncio.gather(*streams)
            for a, b in itertools.pairwise(times) if a >= decoding]
    await asyncio.gather(*arrivals)
    return gaps


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of the throughput and stall phases")
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput phase")
    parser.add_argument("--max-loras", type=int, default=16, help="adapter slots")
    parser.add_argument("--stalls-only", action="store_true", help="only the stall phase")
    parser.add_argument("--cold-loads", choices=["auto", "between", "beside"], default="auto",
                        help="where the async engine runs a cold adapter's CPU work: between steps, beside them "
                             "in the request's thread, or as the machine suggests")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    # the streams' prompts, then one of its own for each newcomer of the stall phase (none shares a cached prefix)
    prompts = make_prompts(load_tokenizer(folder), max(args.num_prompts, 32) + 24 * args.rounds, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="many-adapters-"))
    start = time.perf_counter()
    small = make_adapters(folder, tmp, 8, args.adapters, seed=0, target_modules=["q_proj", "v_proj"])
    print(f"made {len(small)} r8 q/v adapters in {time.perf_counter() - start:.0f} s", flush=True)
    requests = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(small)]
    if args.throughput_only:
        throughput_and_cold_loads(args, prompts[:args.num_prompts], requests, [])
        return
    if not args.stalls_only:
        big = make_adapters(folder, tmp, 16, 12, seed=5000)
        throughput_and_cold_loads(args, prompts[:args.num_prompts], requests, big)
    stalls(args, prompts, requests)


def throughput_and_cold_loads(args, prompts: list[list[int]], requests: list[LoRARequest], big: list[Path]) -> None:
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, max_loras=args.max_loras, **LORA)
    throughput(llm, prompts[:8], 4, requests[:8])  # warm-up
    rng, rows = random.Random(0), {"8 resident": [], "uniform": [], "ratio": []}
    for r in range(args.rounds):  # paired: both cases once per round, a fresh uniform draw each round
        rows["8 resident"].append(throughput(llm, prompts, args.output_len,
                                             [requests[i % 8] for i in range(len(prompts))]))
        spread = [rng.choice(requests) for _ in prompts]
        rows["uniform"].append(throughput(llm, prompts, args.output_len, spread))
        rows["ratio"].append(rows["uniform"][-1] / rows["8 resident"][-1])
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()) +
              f" ({len({q.lora_int_id for q in spread})} distinct adapters)", flush=True)
    print(f"throughput, out tok/s ({len(prompts)} requests x {args.output_len} tokens, {args.max_loras} slots; "
          f"8 resident r8 adapters vs each request on one of {args.adapters} drawn uniformly; median of "
          f"{args.rounds} rounds): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in rows.items()),
          flush=True)

    if not big:
        return
    to_host, to_slot = cold_load_ms(llm, big[:12], 200_000)
    total = [a + b for a, b in zip(to_host, to_slot, strict=True)]
    print(f"cold load of an r16 all-linear adapter (median / max of {len(total)}): disk -> host "
          f"{statistics.median(to_host):.1f} / {max(to_host):.1f} ms (beside the step thread), host -> slot "
          f"{statistics.median(to_slot):.1f} / {max(to_slot):.1f} ms (inside a step); total "
          f"{statistics.median(total):.1f} / {max(total):.1f} ms", flush=True)


def stalls(args, prompts: list[list[int]], requests: list[LoRARequest]) -> None:
    """Three cases per round: the streams alone; newcomers on the streams' own (resident) adapters; newcomers
    on cold adapters. warm/alone is what prefilling newcomers beside decode costs, cold/warm what reading
    and slotting their adapters adds. Prefix caching is off: a cold adapter's newcomer could reuse no cached
    prefix (the KV is per adapter), a warm one the chat template's, which is not what is measured here."""
    between = {"auto": None, "between": True, "beside": False}[args.cold_loads]
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_options(
        model=args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, enable_prefix_caching=False,
        max_loras=args.max_loras, **LORA)),
        between)
    resident, streams, per_round = requests[:8], prompts[:32], 12
    cold_ones = random.Random(1).sample(requests[8:], per_round * args.rounds)  # uniform, each cold once
    own_prompts = iter(prompts[max(args.num_prompts, 32):])
    cases = ("alone", "warm", "cold")
    rows: dict[str, list[float]] = {f"{q} {c}": [] for c in cases for q in ("p50", "p99")}
    rows.update({"cold/warm": [], "cold/alone": [], "warm/alone": []})
    try:
        asyncio.run(itl_with_newcomers(engine, streams[:8], 8, resident, []))  # resident adapters into slots
        for r in range(args.rounds):
            warm = [(resident[i % len(resident)], next(own_prompts)) for i in range(per_round)]
            cold = [(lora, next(own_prompts)) for lora in cold_ones[r * per_round:(r + 1) * per_round]]
            newcomers = {"alone": [], "warm": warm, "cold": cold}
            for case in cases:
                gaps = asyncio.run(itl_with_newcomers(engine, streams, args.output_len, resident, newcomers[case]))
                rows[f"p50 {case}"].append(percentile(gaps, 50))
                rows[f"p99 {case}"].append(percentile(gaps, 99))
            for ratio in ("cold/warm", "cold/alone", "warm/alone"):
                top, bottom = ratio.split("/")
                rows[ratio].append(rows[f"p99 {top}"][-1] / rows[f"p99 {bottom}"][-1])
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    finally:
        engine.shutdown()
    print(f"resident-adapter ITL ms (32 streams on 8 adapters; {per_round} newcomers 100 ms apart, on resident "
          f"or on cold r8 q/v adapters; p99 ratios taken within each round, median of {args.rounds} rounds): "
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
