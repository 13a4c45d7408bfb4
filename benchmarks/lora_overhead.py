"""What LoRA costs, next to what physics allows: one run, same prompts, output tokens/s of each way of
serving adapters, each LoRA case beside its bound measured in the same run.

    python benchmarks/lora_overhead.py [--dtype auto] [--num-prompts 64] [--output-len 128] [--repeats 3]
    python benchmarks/lora_overhead.py --kinds-only [--rounds 5]
    python benchmarks/lora_overhead.py --scales-mixes-only [--rounds 5]

Settings: the base model; LoRA enabled with no adapter used; one r16 adapter for every request; 8 distinct
r16 adapters mixed; 64 distinct r16 adapters mixed (max_loras 64); one r64 adapter; 4 r8 and 4 r64
adapters mixed (the work must follow each adapter's own rank); that r16 adapter merged into the weights;
and transformers + PEFT serving the 8-adapter mix (one batched generate per adapter group). Adapters are
random (non-zero B) all-linear PEFT adapters of the default model, made in a temp folder.

Adapter kinds (issue 17): one r16 adapter of each kind for all requests -- plain LoRA, DoRA, LoRA on the
embedding and lm_head (with q/v), modules_to_save lm_head (with q/v LoRA) -- and the base, all engines loaded
at once and measured in paired rounds (every case once per round, its ratio to the base of that round, the
median over the rounds), so the machine's drift falls on every row alike.

Scales and mixes (issue 18), paired rounds the same way, every LoRA row on one engine (max_loras 8, max rank
64): one r16 adapter at scale 1; the same adapter at 8 distinct lora_scales (must cost what one adapter
costs); 8 distinct r16 adapters; 8 distinct 2-adapter mixes (LoRAMix); and the slot design of a mix measured
both ways on 8 distinct 4-adapter mixes: LoRAMix (each token runs its 4 adapters' own slots, summed in the
kernel) against the same mixes stacked into one r64 slot each (PEFT's add_weighted_adapter "cat", written as
adapters and served as plain ones: what "one stacked slot per distinct mix" computes).

The bound of a case (benchmarks/bounds.py) is base step time / (base step time + the bytes of the distinct
adapters one step reads / measured bandwidth + the step's LoRA FLOPs / the measured matmul rate), with the
base step time taken from the base row of this run; `of bound` is the measured ratio over that.
"""
from __future__ import annotations

import copy
import functools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from bounds import decode_shapes, lora_bound, matmul_rate, memory_bandwidth
from loraserve import LLM, LoRAMix, LoRARequest, SamplingParams
from loraserve.lora.merge import merge_adapter
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import llm_dtype, make_prompts, workload_parser


def make_adapters(folder: Path, out: Path, rank: int, count: int, seed: int,
                  target_modules: str | list[str] = "all-linear") -> list[Path]:
    """`count` random PEFT adapters of one shape, written by PEFT itself (one model, re-randomised per
    adapter). B is scaled down so generations stay natural."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    paths = []
    for i in range(count):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                    if "lora_B" in name:
                        param.mul_(0.01)
        path = out / f"r{rank}-{seed + i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


@functools.cache
def adapter_numel(path: Path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is not iterable


@dataclass
class Machine:
    """What the bounds are measured against, once per run."""

    base_step_seconds: float
    bandwidth: float
    rate: float
    itemsize: int
    tokens_per_step: int

    def bound(self, adapters: list[Path] | list[tuple[Path, ...]]) -> float:
        """`adapters`: the adapter of each request, or the adapters of its mix (requests cycle over them, all
        in flight together)."""
        adapters = [a if isinstance(a, tuple) else (a,) for a in adapters]
        distinct = sorted({p for mix in adapters for p in mix})
        per_token = statistics.mean(sum(adapter_numel(p) for p in mix) for mix in adapters)
        nbytes = sum(adapter_numel(p) for p in distinct) * self.itemsize
        flops = 2 * per_token * self.tokens_per_step
        return lora_bound(self.base_step_seconds, nbytes, flops, self.bandwidth, self.rate)


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int, loras, repeats: int) -> tuple[float, list[float]]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False, lora_request=loras[:8] if isinstance(loras, list) else loras)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
        runs.append(len(prompts) * output_len / (time.perf_counter() - start))
    return statistics.median(runs), runs


def peft_mixed_throughput(folder: Path, adapters: list[Path], prompts: list[list[int]], output_len: int,
                          dtype: torch.dtype, pad_id: int) -> float:
    """transformers + PEFT at its best for a mix: all adapters loaded once, one padded batched generate
    per adapter group."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), adapters[0],
                                      adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    groups = [prompts[i::len(adapters)] for i in range(len(adapters))]
    start = time.perf_counter()
    for i, group in enumerate(groups):
        model.set_adapter(f"a{i}")
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                           do_sample=False, pad_token_id=pad_id)
    return len(prompts) * output_len / (time.perf_counter() - start)


_IDS: dict[Path, int] = {}  # one lora_int_id per adapter for the whole run


def requests_for(adapters: list[Path], count: int) -> tuple[list[LoRARequest], list[Path]]:
    """Request i uses adapter i mod len(adapters)."""
    chosen = [adapters[i % len(adapters)] for i in range(count)]
    return [LoRARequest(path.name, _IDS.setdefault(path, len(_IDS) + 1), str(path)) for path in chosen], chosen


KINDS = {
    "plain r16 (all-linear)": dict(target_modules="all-linear"),
    "DoRA r16 (all-linear)": dict(target_modules="all-linear", use_dora=True),
    "embed_tokens + lm_head + q/v LoRA r16": dict(target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]),
    "modules_to_save lm_head + q/v r16": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
}


def paired_rounds(cases: dict[str, tuple[LLM, object]], prompts: list[list[int]], rounds: int, output_len: int,
                  title: str, bounds: dict[str, float] | None = None) -> dict:
    """Every case once per round, its ratio to the first case (the base) of that round; prints the medians
    and returns them (with the bounds and every round's ratio)."""
    for llm, lora in cases.values():  # warm: adapters read and in slots, kernels built
        run_engine(llm, prompts, 4, lora, 1)
    base = next(iter(cases))
    ratios: dict[str, list[float]] = {kind: [] for kind in cases}
    speeds: dict[str, list[float]] = {kind: [] for kind in cases}
    for _ in range(rounds):
        measured = {kind: run_engine(llm, prompts, output_len, lora, 1)[0] for kind, (llm, lora) in cases.items()}
        for kind, speed in measured.items():
            speeds[kind].append(speed)
            ratios[kind].append(speed / measured[base])
    print(f"{title}, {len(prompts)} in flight x {output_len} tokens, {rounds} paired rounds "
          f"(median ratio to the {base} of the same round):", flush=True)
    reference = statistics.median(ratios[list(cases)[1]])
    for kind in cases:
        ratio = statistics.median(ratios[kind])
        line = (f"{kind:48s} {statistics.median(speeds[kind]):8.1f} out tok/s  {ratio:.3f}x base  "
                f"{ratio / reference:.3f}x {list(cases)[1]}")
        if bounds and kind in bounds:
            line += f"  | bound {bounds[kind]:.3f}x, of bound {ratio / bounds[kind]:.2f}"
        print(f"{line}  rounds: {', '.join(f'{r:.3f}' for r in ratios[kind])}", flush=True)
    return {"ratios": {kind: statistics.median(r) for kind, r in ratios.items()}, "bounds": bounds or {},
            "speeds": {kind: statistics.median(v) for kind, v in speeds.items()}, "rounds": ratios}


def kinds_rows(args, folder: Path, prompts: list[list[int]], tmp: Path) -> None:
    """Each kind's cost at num_prompts in flight, beside plain LoRA and the base, in paired rounds."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    paths = {}
    for i, (kind, options) in enumerate(KINDS.items()):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                                     **options))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.mul_(0.01)
        paths[kind] = tmp / f"kind-{i}"
        peft_model.save_pretrained(paths[kind])
    common = dict(dtype=args.dtype, max_num_seqs=args.num_prompts)
    engines = {"base": LLM(args.model, **common),
               "lora": LLM(args.model, enable_lora=True, max_loras=len(KINDS), max_lora_rank=16, **common)}
    cases = {"base": (engines["base"], None)} | {
        kind: (engines["lora"], LoRARequest(f"kind{i}", 1000 + i, str(path))) for i, (kind, path) in
        enumerate(paths.items())}
    paired_rounds(cases, prompts, args.rounds, args.output_len, "adapter kinds")


def stacked_mixes(folder: Path, adapters: list[Path], mixes: list[list[tuple[int, float]]], out: Path) -> list[Path]:
    """Each mix written as one adapter by PEFT's add_weighted_adapter(combination_type="cat"): the
    constituents' A (times weight x scaling) and B stacked, rank = the sum of theirs, scaling 1."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapters[0],
                                      adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    paths = []
    for m, mix in enumerate(mixes):
        name = f"mix{m}"
        model.add_weighted_adapter([f"a{i}" for i, _ in mix], [w for _, w in mix], name, combination_type="cat")
        model.save_pretrained(out / "stacked", selected_adapters=[name])
        paths.append(out / "stacked" / name)
    return paths


def scale_mix_rows(args, folder: Path, prompts: list[list[int]], tmp: Path) -> None:
    """Per-request scales and weighted mixes at num_prompts in flight, in paired rounds, with their bounds."""
    r16 = make_adapters(folder, tmp, 16, 8, seed=300)
    pairs = [[(i, 0.5), ((i + 1) % 8, 0.5)] for i in range(8)]
    fours = [[((i + k) % 8, w) for k, w in enumerate((0.4, 0.3, 0.2, 0.1))] for i in range(8)]
    stacked = stacked_mixes(folder, r16, fours, tmp)
    n = args.num_prompts
    ids = {path: 2000 + i for i, path in enumerate(r16 + stacked)}

    def request(path: Path, scale: float = 1.0) -> LoRARequest:
        return LoRARequest(path.name, ids[path], str(path), lora_scale=scale)

    def mixes(chosen: list[list[tuple[int, float]]]) -> list[LoRAMix]:
        return [LoRAMix([(request(r16[a]), w) for a, w in chosen[i % len(chosen)]]) for i in range(n)]

    common = dict(dtype=args.dtype, max_num_seqs=n)
    base = LLM(args.model, **common)
    lora = LLM(args.model, enable_lora=True, max_loras=8, max_lora_rank=64, max_loras_per_mix=4, **common)
    cases = {
        "base": (base, None),
        "one r16 adapter for all": (lora, request(r16[0])),
        "one r16 adapter at 8 distinct lora_scales": (lora, [request(r16[0], 0.25 * (1 + i % 8)) for i in range(n)]),
        "8 distinct r16 adapters": (lora, [request(r16[i % 8]) for i in range(n)]),
        "8 distinct 2-adapter mixes (LoRAMix)": (lora, mixes(pairs)),
        "8 distinct 4-adapter mixes (LoRAMix, own slots)": (lora, mixes(fours)),
        "8 distinct 4-adapter mixes (stacked r64 slots)": (lora, [request(stacked[i % 8]) for i in range(n)]),
    }
    # bounds: the distinct adapters' bytes once per step, every token's own LoRA FLOPs
    shapes, dtype = decode_shapes(base.engine.model), base.engine.dtype
    run_engine(base, prompts, args.output_len, None, 1)
    step = n / run_engine(base, prompts, args.output_len, None, 1)[0]
    machine = Machine(base_step_seconds=step, bandwidth=memory_bandwidth(), rate=matmul_rate(shapes, n, dtype),
                      itemsize=dtype.itemsize, tokens_per_step=n)
    per_request = {"one r16 adapter for all": [(r16[0],)] * n,
                   "one r16 adapter at 8 distinct lora_scales": [(r16[0],)] * n,
                   "8 distinct r16 adapters": [(r16[i % 8],) for i in range(n)],
                   "8 distinct 2-adapter mixes (LoRAMix)": [tuple(r16[a] for a, _ in pairs[i % 8]) for i in range(n)],
                   "8 distinct 4-adapter mixes (LoRAMix, own slots)": [tuple(r16[a] for a, _ in fours[i % 8])
                                                                       for i in range(n)],
                   "8 distinct 4-adapter mixes (stacked r64 slots)": [(stacked[i % 8],) for i in range(n)]}
    bounds = {kind: machine.bound(adapters) for kind, adapters in per_request.items()}
    paired_rounds(cases, prompts, args.rounds, args.output_len, "per-request scales and weighted mixes", bounds)


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of the adapter-kinds rows")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--kinds-only", action="store_true", help="only the adapter-kinds rows")
    parser.add_argument("--scales-mixes-only", action="store_true", help="only the scale and mix rows")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    prompts = make_prompts(tokenizer, args.num_prompts, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="lora-overhead-"))
    if args.kinds_only:
        kinds_rows(args, folder, prompts, tmp)
        return
    if args.scales_mixes_only:
        scale_mix_rows(args, folder, prompts, tmp)
        return
    r16 = make_adapters(folder, tmp, 16, 64, seed=0)
    r64 = make_adapters(folder, tmp, 64, 4, seed=100)
    r8 = make_adapters(folder, tmp, 8, 4, seed=200)
    merged = merge_adapter(args.model, str(r16[0]), tmp / "merged")
    common = dict(dtype=args.dtype, max_num_seqs=args.num_prompts)
    print(f"model {folder}  dtype {args.dtype}  {len(prompts)} prompts x {args.output_len} tokens, "
          f"median of {args.repeats}", flush=True)

    results: dict[str, float] = {}
    machine: Machine | None = None

    def report(name: str, llm: LLM, loras, adapters: list[Path] | None = None) -> None:
        median, runs = run_engine(llm, prompts, args.output_len, loras, args.repeats)
        results[name] = median
        line = (f"{name:34s} {median:8.1f} out tok/s  ({median / results.get('base', median):.3f}x base)  "
                f"runs: {', '.join(f'{r:.0f}' for r in runs)}")
        if adapters is not None:
            bound = machine.bound(adapters)
            line += f"  | bound {bound:.3f}x, of bound {median / results['base'] / bound:.2f}"
        print(line, flush=True)

    base = LLM(args.model, **common)
    report("base", base, None)
    shapes, dtype = decode_shapes(base.engine.model), base.engine.dtype
    machine = Machine(base_step_seconds=args.num_prompts / results["base"], bandwidth=memory_bandwidth(),
                      rate=matmul_rate(shapes, args.num_prompts, dtype), itemsize=dtype.itemsize,
                      tokens_per_step=args.num_prompts)
    print(f"bounds from: base step {machine.base_step_seconds * 1e3:.1f} ms, bandwidth "
          f"{machine.bandwidth / 1e9:.1f} GB/s, matmul rate {machine.rate / 1e9:.0f} GFLOP/s", flush=True)
    del base

    lora_llm = LLM(args.model, enable_lora=True, max_loras=8, max_lora_rank=16, **common)
    report("LoRA enabled, no adapter used", lora_llm, None)
    loras, chosen = requests_for(r16[:1], args.num_prompts)
    report("one r16 adapter for all", lora_llm, loras[0], chosen)
    loras, chosen = requests_for(r16[:8], args.num_prompts)
    report("8 distinct r16 adapters mixed", lora_llm, loras, chosen)
    del lora_llm
    many = LLM(args.model, enable_lora=True, max_loras=64, max_lora_rank=16, **common)
    loras, chosen = requests_for(r16, args.num_prompts)
    report("64 distinct r16 adapters mixed", many, loras, chosen)
    del many
    wide = LLM(args.model, enable_lora=True, max_loras=8, max_lora_rank=64, **common)
    loras, chosen = requests_for(r64[:1], args.num_prompts)
    report("one r64 adapter for all", wide, loras[0], chosen)
    loras, chosen = requests_for([p for pair in zip(r8, r64, strict=True) for p in pair], args.num_prompts)
    report("4 r8 + 4 r64 adapters mixed", wide, loras, chosen)
    print(f"{'':34s} (if every adapter cost r64: bound {machine.bound(r64[:4] * 2):.3f}x)")
    del wide
    report("r16 adapter merged into weights", LLM(str(merged), **common), None)
    if not args.skip_peft:
        peft = peft_mixed_throughput(folder, r16[:8], prompts, args.output_len, llm_dtype(args.dtype),
                                     tokenizer.pad_token_id or 0)
        print(f"{'transformers+peft, 8-adapter mix':34s} {peft:8.1f} out tok/s  "
              f"(engine mix is {results['8 distinct r16 adapters mixed'] / peft:.1f}x)")
    kinds_rows(args, folder, prompts, tmp)
    scale_mix_rows(args, folder, prompts, tmp)


if __name__ == "__main__":
    main()
