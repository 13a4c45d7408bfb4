"""The seed's headline table on this machine: what on-the-fly LoRA costs against the base, next to its physical
bound, measured in paired rounds (every case once per round, its ratio to the LoRA-enabled engine's base
requests of that round, the median over the rounds), so the machine's drift falls on every row alike.

    python benchmarks/seed_table.py [--rounds 5] [--workloads 32x512 64x128] [--plot docs/img/seed_table.png]
    python benchmarks/seed_table.py --from-json benchmarks/results/seed_table.json   # redraw the plot only

Cases (the seed: Llama-3.1-8B on an A100, batch 32, 512 output tokens, one r16 3 %, r64 7 %, merged 0 %):
base requests on an engine without LoRA; base requests on a LoRA-enabled engine (the denominator); an r16
adapter merged into the weights; one r16 all-linear adapter for every request; one r64; 8 distinct r16 adapters
mixed. Prompts are chat prompts of the default model (benchmarks/throughput.make_prompts), greedy, ignore_eos.
The bound of a case is base step / (base step + the distinct adapters' bytes / bandwidth + the step's LoRA
FLOPs / the matmul rate) (benchmarks/bounds.py); results go to benchmarks/results/seed_table.json.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bounds import decode_shapes, matmul_rate, memory_bandwidth
from lora_overhead import Machine, make_adapters, paired_rounds, requests_for, run_engine
from loraserve import LLM
from loraserve.lora.merge import merge_adapter
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts, workload_parser

ROOT = Path(__file__).resolve().parents[1]
BASE = "base on the LoRA-enabled engine"


def table(args, prompts: list[list[int]], output_len: int, engines: dict[str, LLM], r16, r64) -> dict:
    n = len(prompts)
    mixed, mixed_paths = requests_for(r16[:8], n)
    one16, _ = requests_for(r16[:1], 1)
    one64, _ = requests_for(r64[:1], 1)
    cases = {
        BASE: (engines["lora"], None),
        "base on an engine without LoRA": (engines["base"], None),
        "r16 merged into the weights": (engines["merged"], None),
        "one r16 adapter, all-linear": (engines["lora"], one16[0]),
        "one r64 adapter, all-linear": (engines["lora"], one64[0]),
        "8 distinct r16 adapters mixed": (engines["lora"], mixed),
    }
    base = engines["base"]
    shapes, dtype = decode_shapes(base.engine.model), base.engine.dtype
    step = n / run_engine(base, prompts, min(output_len, 128), None, 1)[0]
    machine = Machine(base_step_seconds=step, bandwidth=memory_bandwidth(), rate=matmul_rate(shapes, n, dtype),
                      itemsize=dtype.itemsize, tokens_per_step=n)
    bounds = {BASE: 1.0, "base on an engine without LoRA": 1.0, "r16 merged into the weights": 1.0,
              "one r16 adapter, all-linear": machine.bound([r16[0]] * n),
              "one r64 adapter, all-linear": machine.bound([r64[0]] * n),
              "8 distinct r16 adapters mixed": machine.bound(mixed_paths)}
    return paired_rounds(cases, prompts, args.rounds, output_len, "seed table", bounds)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results)
    cases = [c for c in results[workloads[0]]["ratios"] if c != BASE]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(workloads)
    for w, workload in enumerate(workloads):
        ratios = [results[workload]["ratios"][c] for c in cases]
        xs = [i + (w - (len(workloads) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, ratios, width, label=f"measured, {workload}")
        bounds = [results[workload]["bounds"][c] for c in cases]
        ax.scatter(xs, bounds, marker="_", s=400, color="black", zorder=3,
                   label="physical bound" if w == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace(", all-linear", "").replace(" into the weights", "") for c in cases],
                       rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0.6, 1.1)
    ax.set_ylabel("throughput / LoRA-enabled engine's base")
    ax.set_title("The seed's table on a 2-core EPYC, default model, bf16 (paired rounds, medians)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["32x512", "64x128"])
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "seed_table.png"))
    parser.add_argument("--from-json", help="draw the plot from a results file of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        plot(json.loads(Path(args.from_json).read_text()), Path(args.plot))
        return
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    tmp = Path(tempfile.mkdtemp(prefix="seed-table-"))
    r16 = make_adapters(folder, tmp, 16, 8, seed=0)
    r64 = make_adapters(folder, tmp, 64, 1, seed=100)
    merged = merge_adapter(args.model, str(r16[0]), tmp / "merged")
    workloads = [tuple(int(v) for v in w.split("x")) for w in args.workloads]
    most = max(n for n, _ in workloads)
    common = dict(dtype=args.dtype, max_num_seqs=most)
    engines = {"base": LLM(args.model, **common), "merged": LLM(str(merged), **common),
               "lora": LLM(args.model, enable_lora=True, max_loras=8, max_lora_rank=64, **common)}
    results = {}
    for n, output_len in workloads:
        prompts = make_prompts(tokenizer, n, seed=0)
        results[f"{n}x{output_len}"] = table(args, prompts, output_len, engines, r16, r64)
    out = ROOT / "benchmarks" / "results" / "seed_table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


if __name__ == "__main__":
    main()
