"""loraserve beside llama.cpp on the same GGUF file, in paired rounds.

    bash benchmarks/peers/llamacpp.sh [--rounds 5] [--output-len 128] [--in-flight 1 64]

Both engines read the default model's Q4_1 GGUF as it is (loraserve with quantization="gguf", bf16; llama.cpp's
own server through the xllamacpp wheel, in a process of its own). The adapters are 8 random r16 all-linear PEFT
adapters (lora_overhead.make_adapters); llama.cpp gets them converted by its own convert_lora_to_gguf.py.
Cases: base (no adapter), one r16 adapter for every request, 8 distinct r16 adapters mixed (request i takes
adapter i mod 8; not at 1 in flight, where it is the one-adapter case). For every number of requests in
flight, each round runs every case once on each engine, back to back, and takes the ratio within the round;
the medians over the rounds are printed. Greedy, ignore_eos, chat prompts (throughput.make_prompts), no prefix
cache on either side.

At 1 in flight the figure is the decode time per token, (time of an --output-len run - time of a 1-token run)
/ (--output-len - 1), the prefill left out the same way on both sides; at more, generated tokens per second
over the whole batch. llamacpp.sh sets up the peer (LLAMACPP_PYTHON, LLAMACPP_CONVERT); results go to
benchmarks/results/llamacpp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder

from lora_overhead import make_adapters, requests_for
from loraserve import LLM, SamplingParams
from loraserve.model.loader import GGUF_WEIGHTS, load_tokenizer, resolve_model
from throughput import make_prompts

RESULTS = Path(__file__).resolve().parents[1] / "results"
CASES = {"base": 0, "one r16": 1, "8 distinct r16 mixed": 8}  # case -> distinct adapters


class LlamaCpp:
    """llamacpp_side.py in the peer's venv: one llama.cpp server, batches sent as JSON lines."""

    def __init__(self, model: Path, adapters: list[Path], parallel: int, ctx: int, threads: int, folder: Path):
        config = folder / f"llamacpp-{parallel}.json"
        config.write_text(json.dumps({"model": str(model), "adapters": [str(a) for a in adapters],
                                      "parallel": parallel, "ctx": ctx, "threads": threads}))
        self.log = open(folder / f"llamacpp-{parallel}.log", "w")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([os.environ["LLAMACPP_PYTHON"], str(Path(__file__).with_name("llamacpp_side.py")),
                                      str(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        if self.proc.stdout.readline().strip() != "READY":
            raise SystemExit(f"llama.cpp did not start; see {self.log.name}")

    def run(self, prompts: list[list[int]], adapters: list[int | None], max_tokens: int) -> tuple[float, int]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "adapters": adapters, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("RESULT "):
            raise SystemExit(f"llama.cpp failed; see {self.log.name}")
        result = json.loads(line[len("RESULT "):])
        return result["elapsed"], result["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def convert(adapters: list[Path], base: Path, out: Path) -> list[Path]:
    """Each PEFT adapter as a LoRA GGUF, by llama.cpp's own converter (f16, its default)."""
    paths = []
    for adapter in adapters:
        path = out / f"{adapter.name}.gguf"
        subprocess.run([sys.executable, os.environ["LLAMACPP_CONVERT"], "--base", str(base), "--outfile", str(path),
                        str(adapter)], check=True, capture_output=True)
        paths.append(path)
    return paths


def ours(llm: LLM, prompts: list[list[int]], loras: list, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)


def figure(run, prompts, adapters, output_len: int) -> float:
    """ms per decoded token at one in flight (prefill left out), else tokens per second."""
    elapsed, tokens = run(prompts, adapters, output_len)
    assert tokens == len(prompts) * output_len, (tokens, len(prompts), output_len)
    if len(prompts) > 1:
        return tokens / elapsed
    first, _ = run(prompts, adapters, 1)
    return (elapsed - first) / (output_len - 1) * 1000


def measure(in_flight: int, args, prompts, peft: list[Path], ggufs: list[Path], tmp: Path) -> dict:
    ctx = max(len(p) for p in prompts) + args.output_len + 8
    gguf = (resolve_model(None, keep_gguf=True) / GGUF_WEIGHTS).resolve()
    peer = LlamaCpp(gguf, ggufs, in_flight, ctx, args.threads, tmp)
    llm = LLM(None, quantization="gguf", enable_lora=True, max_loras=8, max_lora_rank=16)
    batch = prompts[:in_flight]
    plans = {}
    for case, count in CASES.items():
        if count > in_flight:  # one stream cannot mix: its one adapter is the "one r16" case
            continue
        index = [None if count == 0 else i % count for i in range(in_flight)]
        loras = None if count == 0 else requests_for(peft[:count], in_flight)[0]
        plans[case] = (index, loras)
    unit = "ms/token" if in_flight == 1 else "tok/s"
    for index, loras in plans.values():  # warm: adapters read and in slots, kernels built, pages touched
        ours(llm, batch, loras, 4)
        peer.run(batch, index, 4)
    rows: dict[str, dict[str, list[float]]] = {case: {"loraserve": [], "llama.cpp": [], "ratio": []}
                                               for case in plans}
    for r in range(args.rounds):
        for case, (index, loras) in plans.items():
            a = figure(lambda p, _i, n, loras=loras: ours(llm, p, loras, n), batch, index, args.output_len)
            b = figure(peer.run, batch, index, args.output_len)
            row = rows[case]
            row["loraserve"].append(a)
            row["llama.cpp"].append(b)
            # ratio > 1 means loraserve is ahead: llama.cpp's time over ours, or our rate over llama.cpp's
            row["ratio"].append(b / a if in_flight == 1 else a / b)
        print(f"  round {r + 1}: " + ", ".join(f"{c} {rows[c]['ratio'][-1]:.3f}" for c in plans), flush=True)
    peer.close()
    print(f"{in_flight} in flight ({unit}; ratio = how many times faster loraserve is, median of {args.rounds}):")
    for case, row in rows.items():
        print(f"  {case:<22} loraserve {statistics.median(row['loraserve']):8.2f}  llama.cpp "
              f"{statistics.median(row['llama.cpp']):8.2f}  ratio {statistics.median(row['ratio']):.3f}")
    return {"unit": unit, "cases": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    folder = resolve_model(None)
    prompts = make_prompts(load_tokenizer(folder), max(args.in_flight), seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="llamacpp-"))
    peft = make_adapters(folder, tmp, 16, 8, seed=316)
    ggufs = convert(peft, folder, tmp)
    results = {"output_len": args.output_len, "rounds": args.rounds,
               "in_flight": {n: measure(n, args, prompts, peft, ggufs, tmp) for n in args.in_flight}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
