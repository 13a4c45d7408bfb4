"""What LoRA costs: one run, same prompts, output tokens/s of each way of serving adapters.

    python benchmarks/lora_overhead.py [--dtype auto] [--num-prompts 64] [--output-len 128]

Settings: the base model; LoRA enabled with no adapter used; one r16 adapter for every request; 8 distinct
r16 adapters mixed in one batch; one r64 adapter; that r16 adapter merged into the weights; and
transformers + PEFT serving the 8-adapter mix (one batched generate per adapter group). Adapters are random
(non-zero B) all-linear PEFT adapters of the default model, made in a temp folder.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.lora.merge import merge_adapter
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import llm_dtype, make_prompts, workload_parser


def make_adapter(folder: Path, out: Path, rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # keep the adapter's effect moderate so generations stay natural
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    peft_model.save_pretrained(out)
    return out


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


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    prompts = make_prompts(tokenizer, args.num_prompts, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="lora-overhead-"))
    r16 = [make_adapter(folder, tmp / f"r16-{i}", 16, seed=i) for i in range(8)]
    r64 = make_adapter(folder, tmp / "r64", 64, seed=100)
    merged = merge_adapter(args.model, str(r16[0]), tmp / "merged")
    one = LoRARequest("r16-0", 1, str(r16[0]))
    mix = [LoRARequest(f"r16-{i % 8}", i % 8 + 1, str(r16[i % 8])) for i in range(len(prompts))]
    common = dict(dtype=args.dtype, max_num_seqs=args.num_prompts)
    print(f"model {folder}  dtype {args.dtype}  {len(prompts)} prompts x {args.output_len} tokens, "
          f"median of {args.repeats}")

    results: dict[str, float] = {}

    def report(name: str, llm: LLM, loras) -> None:
        median, runs = run_engine(llm, prompts, args.output_len, loras, args.repeats)
        results[name] = median
        print(f"{name:34s} {median:8.1f} out tok/s  ({median / results['base']:.3f}x base)  "
              f"runs: {', '.join(f'{r:.0f}' for r in runs)}", flush=True)

    results["base"] = 1.0
    report("base", LLM(args.model, **common), None)
    lora_llm = LLM(args.model, enable_lora=True, max_loras=8, max_lora_rank=16, **common)
    report("LoRA enabled, no adapter used", lora_llm, None)
    report("one r16 adapter for all", lora_llm, one)
    report("8 distinct r16 adapters mixed", lora_llm, mix)
    del lora_llm
    report("one r64 adapter for all", LLM(args.model, enable_lora=True, max_lora_rank=64, **common),
           LoRARequest("r64", 9, str(r64)))
    report("r16 adapter merged into weights", LLM(str(merged), **common), None)
    if not args.skip_peft:
        peft = peft_mixed_throughput(folder, r16, prompts, args.output_len, llm_dtype(args.dtype),
                                     tokenizer.pad_token_id or 0)
        print(f"{'transformers+peft, 8-adapter mix':34s} {peft:8.1f} out tok/s  "
              f"(engine mix is {results['8 distinct r16 adapters mixed'] / peft:.1f}x)")


if __name__ == "__main__":
    main()
