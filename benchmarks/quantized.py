"""Quantized bases side by side, one run: for each way of holding the default model's weights, the resident
memory it adds, the weight bytes it holds, how close its greedy decoding stays to fp32, single-stream decode and
throughput at 64 in flight, without and with 8 mixed LoRA adapters.

    python benchmarks/quantized.py [--num-prompts 64] [--output-len 128] [--rounds 5] [--matmuls-only]

First the matmuls alone, per shape of the default model at 1 and 64 tokens: the bf16 prepacked matmul, PyTorch's
CPU weight-only kernels (`_weight_int8pack_mm`, int8 per row; `_weight_int4pack_mm_for_cpu`, int4 groups of 64)
and loraserve's (layers/csrc/quant_matmul.cpp) on the same int8 / int4 weights, as microseconds per call with the
weights warm in cache (the engine rows below are the real, cold case).

Rows: bf16 (the GGUF de-quantized, the default); int8 and int4 (quantized at load, layers/quantizers.py); GGUF
Q4_1 (the shipped file kept quantized, Q8_0 embeddings); GGUF Q8_0 (the same weights re-quantized to Q8_0 by the
gguf package, written next to the run).
- Memory: a fresh process per row builds the engine (a fixed 64-block KV cache) and reads its own resident
  memory before and after (/proc/self/statm); "weights" is the engine's count of the bytes it holds.
- Quality, bf16, 8 prompts x 24 tokens at batch 8 (tests/test_quantized_default_model.py's measurement):
  greedy agreement per step (teacher-forced on the engine's own tokens) with transformers fp32 on the weights
  the row holds, de-quantized ("same w": what the kernels lose), and with fp32 on the float original (what
  the scheme loses in all), per step and up to the first differing token; the mean |logprob| drift over the
  top 5 from fp32 on the weights the row holds.
- Speed: every engine loaded at once and measured in turn, round after round; each ratio to bf16 is taken
  within its round and the median over the rounds printed. LoRA: 8 distinct random r16 all-linear adapters,
  requests round-robin over them.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from lora_overhead import make_adapters, requests_for, run_engine
from loraserve import LLM
from loraserve.layers.matmul import MatmulWeight
from loraserve.layers.quantized import QuantizedMatmul
from loraserve.layers.quantizers import quantize_int4, quantize_int8
from loraserve.model.loader import _default_gguf, load_tokenizer, resolve_model
from throughput import make_prompts, single_stream_ms_per_token, workload_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_quantized_default_model as quality_check  # the test's own measurement


def requantize_gguf(source: Path, out: Path, kind: str) -> Path:
    """`source` with every quantized tensor de-quantized and re-quantized to `kind` by the gguf package."""
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        writer.add_key_value(key, field.contents(), value_type,
                             sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
        if tensor.tensor_type.name in ("F32", "F16"):
            writer.add_tensor(tensor.name, np.ascontiguousarray(values))
        else:
            shape = tuple(reversed(tensor.shape.tolist()))
            writer.add_tensor(tensor.name, gguf.quants.quantize(values.reshape(shape), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def call_us(fn, repeats: int = 5) -> float:
    """Median microseconds per call over `repeats` timed loops of about 20 ms each."""
    fn()
    start = time.perf_counter()
    fn()
    loops = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(times)


def torch_int4(weight: torch.Tensor, group: int):
    """PyTorch's CPU int4 kernel on `weight` quantized like quantize_int4 (asymmetric groups)."""
    q = quantize_int4(weight, group)
    values = q.values().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    scales = q.scales.float()  # its layout: w = (q - 8) * scale + zero
    zeros = q.offsets.float() + 8 * scales
    scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().bfloat16()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


def torch_int8(weight: torch.Tensor):
    """PyTorch's CPU int8 kernel (one scale per row) on `weight` quantized symmetric per row."""
    q = quantize_int8(weight, weight.shape[1])
    scales = q.scales.reshape(-1).bfloat16()
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q.data, scales)


def matmul_table() -> None:
    shapes = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
              "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}
    print(f"{'matmul (us per call)':22s} {'tokens':>6s} {'bf16':>8s} {'torch i8':>9s} {'ours i8':>8s} "
          f"{'torch i4':>9s} {'ours i4':>8s}")
    torch.manual_seed(0)
    for name, (rows, cols) in shapes.items():
        weight = torch.randn(rows, cols) * 0.02
        dense = MatmulWeight(weight.bfloat16())
        ours8 = QuantizedMatmul([quantize_int8(weight, cols)])  # per row, as PyTorch's int8 needs
        ours4 = QuantizedMatmul([quantize_int4(weight, 64)])
        theirs8, theirs4 = torch_int8(weight), torch_int4(weight, 64)
        for tokens in (1, 64):
            x = torch.randn(tokens, cols).bfloat16()
            times = [call_us(lambda f=f, x=x: f(x)) for f in (dense, theirs8, ours8, theirs4, ours4)]
            print(f"{name:22s} {tokens:6d} " + " ".join(f"{t:8.0f}" for t in times), flush=True)


CHILD = """
import json, sys
from loraserve import LLM
from loraserve.engine.platform import resident_bytes
before = resident_bytes()
llm = LLM(sys.argv[1] or None, quantization=sys.argv[2] or None, dtype="bfloat16", num_kv_blocks=64,
          max_model_len=1024, enable_prefix_caching=False)
print(json.dumps({"rss": resident_bytes() - before, "weights": llm.engine.weight_bytes}))
"""


def resident(model: str | None, quantization: str | None) -> dict:
    """Resident memory an engine adds to a fresh process, and the weight bytes it holds."""
    out = subprocess.run([sys.executable, "-c", CHILD, model or "", quantization or ""], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(llm: LLM, hf) -> tuple[float, float, float, float]:
    """Greedy agreement with fp32 on the weights `llm` holds (per step), with fp32 on the float original (per
    step, and to the first difference), and the mean drift from fp32 on the weights held."""
    outputs = quality_check.run(llm, 8)
    reference = hf if llm.engine.quantization is None else quality_check.served_weights(llm, hf)
    drift, _, own_steps = quality_check.measure(outputs, reference)
    _, prefix, steps = quality_check.measure(outputs, hf)
    return own_steps, steps, prefix, statistics.mean(drift)


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds of the speed phase")
    parser.add_argument("--matmuls-only", action="store_true")
    args = parser.parse_args()
    matmul_table()
    if args.matmuls_only:
        return
    folder = resolve_model(None)
    tokenizer = load_tokenizer(folder)
    prompts = make_prompts(tokenizer, args.num_prompts, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="quantized-bench-"))
    adapters = make_adapters(folder, tmp, 16, 8, seed=0)
    q8_0 = requantize_gguf(_default_gguf(), tmp / "SmolLM2-135M-Instruct.Q8_0.gguf", "Q8_0")
    rows = {"bf16": (str(folder), None), "int8 (at load)": (str(folder), "int8"),
            "int4 (at load)": (str(folder), "int4"), "GGUF Q4_1": (None, "gguf"), "GGUF Q8_0": (str(q8_0), "gguf")}
    memory = {name: resident(*row) for name, row in rows.items()}
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engines = {name: LLM(model, quantization=q, dtype="bfloat16", max_num_seqs=args.num_prompts, enable_lora=True,
                         max_loras=8, kv_cache_memory_gb=0.25) for name, (model, q) in rows.items()}
    scores = {name: quality(llm, hf) for name, llm in engines.items()}
    del hf
    print(f"{len(prompts)} prompts x {args.output_len} tokens, dtype bfloat16; LoRA: 8 mixed r16 all-linear "
          f"adapters; every engine loaded at once and measured in turn, {args.rounds} rounds", flush=True)
    loras, _ = requests_for(adapters, args.num_prompts)
    runs: dict[str, dict[str, list[float]]] = {name: {"latency": [], "base": [], "lora": []} for name in rows}
    for _ in range(args.rounds):  # round-robin, so the VM's drift falls on every row alike
        for name, llm in engines.items():
            runs[name]["latency"].append(single_stream_ms_per_token(llm, prompts[0], args.output_len))
            runs[name]["base"].append(run_engine(llm, prompts, args.output_len, None, 1)[0])
            runs[name]["lora"].append(run_engine(llm, prompts, args.output_len, loras, 1)[0])
    first = next(iter(rows))

    def ratio(name: str, key: str) -> float:  # within each round, then the median
        return statistics.median(a / b for a, b in zip(runs[name][key], runs[first][key], strict=True))
    print(f"{'weights':16s} {'RSS MiB':>8s} {'weights':>8s} {'same w':>6s} {'agree/step':>10s} {'to 1st diff':>11s} "
          f"{'drift':>6s} {'1 stream ms':>11s} {'x bf16':>6s} {'64: tok/s':>9s} {'x bf16':>6s} "
          f"{'+LoRA tok/s':>11s} {'x bf16':>6s} {'LoRA x':>6s}")
    for name in rows:
        med = {key: statistics.median(values) for key, values in runs[name].items()}
        lora_cost = statistics.median(a / b for a, b in zip(runs[name]["lora"], runs[name]["base"], strict=True))
        own, steps, prefix, drift = scores[name]
        print(f"{name:16s} {memory[name]['rss'] / 2**20:8.0f} {memory[name]['weights'] / 2**20:8.1f} {own:6.3f} "
              f"{steps:10.3f} "
              f"{prefix:11.2f} {drift:6.3f} {med['latency']:11.2f} {ratio(name, 'latency'):6.2f} {med['base']:9.1f} "
              f"{ratio(name, 'base'):6.2f} {med['lora']:11.1f} {ratio(name, 'lora'):6.2f} {lora_cost:6.3f}",
              flush=True)
    print("runs (single stream ms | base tok/s | LoRA tok/s):")
    for name, values in runs.items():
        print(f"  {name:16s} " + " | ".join(", ".join(f"{v:.1f}" for v in values[key]) for key in values))


if __name__ == "__main__":
    main()
