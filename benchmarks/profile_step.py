"""Where a decode step's time goes: torch.profiler over decode steps of N sequences, grouped.

    python benchmarks/profile_step.py [--model M] [--dtype auto] [--seqs 64] [--steps 20] [--lora RANK]
                                      [--adapters 8] [--quantization gguf] [--after 10]
                                      [--output-kind CUMULATIVE|DELTA|FINAL_ONLY]

Prints milliseconds per step of: matmuls, decode attention, the LoRA kernel, the other ATen ops (norms,
rotary, activations, KV writes, sampling; the largest are listed), and what is left of the wall time
(Python: scheduling, batch building, output processing). `--lora RANK` serves every sequence with one of
`--adapters` (default 8) random all-linear adapters of that rank. `--after` decode steps run before the
profiled ones (the outputs' length); `--output-kind` is what each step's outputs hold.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

from lora_overhead import make_adapters
from loraserve import LLM, LoRARequest, RequestOutputKind, SamplingParams
from loraserve.engine.request import Request
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts

GROUPS = {
    "matmul": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "mkldnn", "mkl::", "aten::bmm",
               "loraserve::gemv", "loraserve::quant_matmul"),
    "attention": ("paged_decode_attention", "scaled_dot_product"),
    "lora": ("lora_add_runs",),
    "fused ops": ("loraserve::rms_norm", "loraserve::rotary_kv_write", "loraserve::gated_activation",
                  "loraserve::argmax"),
}


def label_kernels() -> None:
    """Make the C++ kernels (pybind functions, which the profiler does not see) show up by name."""
    from loraserve.layers import cpu_kernels

    for module in (cpu_kernels.paged_attention_module(), cpu_kernels.lora_module(), cpu_kernels.fused_ops_module(),
                   cpu_kernels.quant_module()):
        for name in [n for n in dir(module) if not n.startswith("_")]:
            fn = getattr(module, name)

            def labelled(*args, _fn=fn, _name=f"loraserve::{name}"):
                with record_function(_name):
                    return _fn(*args)
            setattr(module, name, labelled)


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "other ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lora", type=int, default=0, help="rank of the mixed adapters (0: none)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters the sequences cycle over")
    parser.add_argument("--quantization", default=None, help="e.g. gguf: the default model's Q4_1 file as it is")
    parser.add_argument("--after", type=int, default=10, help="decode steps before the profiled ones (output length)")
    parser.add_argument("--output-kind", default="CUMULATIVE", choices=[k.name for k in RequestOutputKind],
                        help="what each step's outputs hold (a streaming server asks for DELTA)")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    prompts = make_prompts(load_tokenizer(folder), args.seqs, seed=0)
    options = dict(dtype=args.dtype, max_num_seqs=args.seqs, quantization=args.quantization)
    loras: list = [None] * args.seqs
    if args.lora:
        count = args.adapters
        options |= dict(enable_lora=True, max_loras=count, max_lora_rank=args.lora)
        tmp = Path(tempfile.mkdtemp(prefix="profile-"))
        paths = make_adapters(folder, tmp, args.lora, count, seed=0)
        loras = [LoRARequest(f"a{i % count}", i % count + 1, str(paths[i % count])) for i in range(args.seqs)]
    label_kernels()
    llm = LLM(args.model, **options)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.steps * 3 + args.after + 40, ignore_eos=True,
                            output_kind=RequestOutputKind[args.output_kind])
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(str(i), None, prompt, params, lora)
    while any(seq.num_computed_tokens < seq.prompt_len for r in engine.requests.values() for seq in r.seqs):
        engine.step()  # prefill everything first
    for _ in range(args.after):
        engine.step()
    building = [0.0]  # seconds spent building the step's RequestOutputs (what --output-kind changes)
    build = Request.output

    def timed_output(request: Request):
        start = time.perf_counter()
        try:
            return build(request)
        finally:
            building[0] += time.perf_counter() - start

    Request.output = timed_output
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = (time.perf_counter() - start) / args.steps * 1000
    Request.output = build
    totals: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            continue
        group = group_of(event.key)
        ms = event.self_cpu_time_total / 1000 / args.steps
        totals[group] += ms
        if group == "other ops":
            others[event.key] += ms
    lora = f"{args.adapters} LoRA r{args.lora} adapters" if args.lora else "no LoRA"
    print(f"{args.seqs} sequences decoding ({args.after} tokens in, {args.output_kind} outputs), {lora}: "
          f"{wall:.1f} ms per step (under the profiler)")
    for group in ("matmul", "attention", "lora", "fused ops", "other ops"):
        print(f"  {group:10s} {totals[group]:6.2f} ms")
    print(f"  {'python':10s} {wall - sum(totals.values()):6.2f} ms (the rest of the wall time; of it, building "
          f"outputs {building[0] / args.steps * 1000:.2f} ms)")
    largest = sorted(others.items(), key=lambda kv: -kv[1])[:12]
    print("  largest other ops: " + ", ".join(f"{k} {v:.2f}" for k, v in largest))


if __name__ == "__main__":
    main()
