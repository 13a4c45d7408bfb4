"""Prefix caching: what it saves when prompts share a system prompt, and that it costs nothing when they
do not. One run, cache on and off side by side.

    python benchmarks/prefix_cache.py [--num-prompts 64] [--output-len 64] [--system-tokens 400] [--repeats 3]

Shared: `--num-prompts` chat requests with one system prompt of about `--system-tokens` tokens and a
different short question each, base model and one r16 adapter. Unshared: throughput.py's prompts, new ones
in every run (only the chat template's opening block repeats). Each
line: output tokens/s and TTFT p50 / p90 (arrival to first token, the whole batch submitted at once), and
the prompt tokens served from the cache.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from lora_overhead import make_adapters, requests_for
from loraserve import LLM, SamplingParams
from loraserve.model.loader import load_tokenizer, resolve_model
from throughput import make_prompts, workload_parser


def shared_prompts(tokenizer, count: int, system_tokens: int) -> list[list[int]]:
    sentence = ("You are the support assistant of a bicycle shop. Be brief, friendly and exact; quote prices "
                "in euros; never invent a part number; offer a repair appointment when a part is worn. ")
    system = sentence * max(1, system_tokens // len(tokenizer.encode(sentence)))
    prompts = []
    for i in range(count):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"Question {i}: how often should I oil chain number {i * 7}?"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def run(llm: LLM, prompts: list[list[int]], output_len: int, lora) -> tuple[float, list[float]]:
    """(output tokens/s, TTFT of each request in ms) for the whole batch submitted at once."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora)
    elapsed = time.perf_counter() - start
    ttft = [(o.metrics.first_token_time - o.metrics.arrival_time) * 1000 for o in outputs]
    return len(prompts) * output_len / elapsed, ttft


def main() -> None:
    parser = workload_parser(__doc__)
    parser.set_defaults(output_len=64)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    shared = shared_prompts(tokenizer, args.num_prompts, args.system_tokens)
    adapter = make_adapters(folder, Path(tempfile.mkdtemp(prefix="prefix-")), 16, 1, seed=0)
    loras, _ = requests_for(adapter, args.num_prompts)
    print(f"model {folder}; shared prompts {statistics.mean(map(len, shared)):.0f} tokens on average, "
          f"{args.num_prompts} requests x {args.output_len} tokens; medians of {args.repeats}", flush=True)
    engines = {on: LLM(args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, enable_lora=True, max_loras=1,
                       max_lora_rank=16, enable_prefix_caching=on) for on in (True, False)}
    cases = (("shared system prompt, base", lambda r: shared, None),
             ("shared system prompt, r16 adapter", lambda r: shared, loras),
             ("no shared prefix, base", lambda r: make_prompts(tokenizer, args.num_prompts, seed=100 + r), None))
    for name, prompts_of, lora in cases:
        prompts = prompts_of(-1)
        for on, llm in engines.items():
            run(llm, prompts[:2], 4, lora[:2] if lora else None)  # warm-up (and, cache on, the prefix)
            blocks = llm.engine.blocks
            hits_before = blocks.hit_tokens
            # the unshared prompts are new in every run: nothing but the chat template's first block repeats
            results = [run(llm, prompts_of(r), args.output_len, lora) for r in range(args.repeats)]
            tps = statistics.median(r[0] for r in results)
            ttft = sorted(t for r in results for t in r[1])
            hit = (blocks.hit_tokens - hits_before) / args.repeats
            print(f"{name:36s} cache {'on ' if on else 'off'}: {tps:7.1f} out tok/s  TTFT p50 "
                  f"{statistics.median(ttft):7.0f} ms  p90 {ttft[int(len(ttft) * 0.9)]:7.0f} ms  "
                  f"cached prompt tokens per run {hit:7.0f} of {sum(map(len, prompts))}", flush=True)


if __name__ == "__main__":
    main()
