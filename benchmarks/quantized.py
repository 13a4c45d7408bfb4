"""Quantized bases side by side, one run: weight memory, single-stream decode and throughput at 64 in flight,
without and with 8 mixed LoRA adapters, for each way of holding the default model's weights.

    python benchmarks/quantized.py [--num-prompts 64] [--output-len 128] [--repeats 3] [--matmuls-only]

First the matmuls alone, per shape of the default model at 1 and 64 tokens: the bf16 prepacked matmul, PyTorch's
CPU weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, int4 groups of 64) and
loraserve's (layers/csrc/quant_matmul.cpp) on the same int8 / int4 weights, as microseconds per call with the
weights warm in cache (the engine rows below are the real, cold case).

Rows: bf16 (the GGUF de-quantized, the default); int8 (per-channel, quantized at load); int4 (GPTQ-style
asymmetric groups of 64 with float16 scale and zero, quantized at load: the layout a GPTQ/AWQ/compressed-tensors
int4 checkpoint is held in); GGUF Q4_1 (the shipped file kept quantized, Q8_0 embeddings); GGUF Q8_0 (the
same weights re-quantized to Q8_0 by the gguf package, written next to the run). Memory is the engine's own
count of the weight bytes it holds (linear layers and all). LoRA: 8 distinct random r16 all-linear adapters,
requests round-robin over them; "LoRA x" is LoRA throughput over the same base's. All five engines are loaded
at once and measured in turn, round after round, so the VM's drift over minutes falls on every row alike.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from lora_overhead import make_adapters, requests_for, run_engine
from loraserve import LLM
from loraserve.layers.linear import Linear
from loraserve.layers.matmul import MatmulWeight
from loraserve.layers.quantized import QuantizedMatmul
from loraserve.layers.quantizers import quantize_int4, quantize_int8
from loraserve.model.loader import _default_gguf, load_tokenizer, resolve_model
from throughput import make_prompts, single_stream_ms_per_token, workload_parser


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
    q = quantize_int8(weight)
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
        ours8, ours4 = QuantizedMatmul([quantize_int8(weight)]), QuantizedMatmul([quantize_int4(weight, 64)])
        theirs8, theirs4 = torch_int8(weight), torch_int4(weight, 64)
        for tokens in (1, 64):
            x = torch.randn(tokens, cols).bfloat16()
            times = [call_us(lambda f=f, x=x: f(x)) for f in (dense, theirs8, ours8, theirs4, ours4)]
            print(f"{name:22s} {tokens:6d} " + " ".join(f"{t:8.0f}" for t in times), flush=True)


def main() -> None:
    parser = workload_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
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
    rows = {
        "bf16": dict(model=None),
        "int8 (at load)": dict(model=None, quantization="int8"),
        "int4 g64 (at load)": dict(model=None, quantization="int4"),
        "GGUF Q4_1": dict(model=None, quantization="gguf"),
        "GGUF Q8_0": dict(model=str(q8_0), quantization="gguf"),
    }
    print(f"{len(prompts)} prompts x {args.output_len} tokens, dtype bfloat16; LoRA: 8 mixed r16 all-linear "
          f"adapters; every engine loaded at once and measured in turn, {args.repeats} rounds (medians)", flush=True)
    engines = {name: LLM(dtype="bfloat16", max_num_seqs=args.num_prompts, enable_lora=True, max_loras=8,
                         kv_cache_memory_gb=0.25, **options) for name, options in rows.items()}
    loras, _ = requests_for(adapters, args.num_prompts)
    runs: dict[str, dict[str, list[float]]] = {name: {"latency": [], "base": [], "lora": []} for name in rows}
    for _ in range(args.repeats):  # round-robin, so the VM's drift falls on every row alike
        for name, llm in engines.items():
            runs[name]["latency"].append(single_stream_ms_per_token(llm, prompts[0], args.output_len))
            runs[name]["base"].append(run_engine(llm, prompts, args.output_len, None, 1)[0])
            runs[name]["lora"].append(run_engine(llm, prompts, args.output_len, loras, 1)[0])
    print(f"{'weights':20s} {'MiB all':>8s} {'linears':>8s} {'x bf16':>7s} {'1 stream ms':>11s} {'x bf16':>7s} "
          f"{'64: tok/s':>9s} {'x bf16':>7s} {'+LoRA tok/s':>11s} {'LoRA x':>7s}")
    first = next(iter(engines))
    for name, llm in engines.items():
        linear_bytes = sum(m.nbytes for m in llm.engine.model.modules() if isinstance(m, Linear))
        reference_bytes = sum(m.nbytes for m in engines[first].engine.model.modules() if isinstance(m, Linear))
        med = {key: statistics.median(values) for key, values in runs[name].items()}
        ref = {key: statistics.median(values) for key, values in runs[first].items()}
        print(f"{name:20s} {llm.engine.weight_bytes / 2**20:8.1f} {linear_bytes / 2**20:8.1f} "
              f"{linear_bytes / reference_bytes:7.2f} {med['latency']:11.2f} {med['latency'] / ref['latency']:7.2f} "
              f"{med['base']:9.1f} {med['base'] / ref['base']:7.2f} {med['lora']:11.1f} "
              f"{med['lora'] / med['base']:7.3f}", flush=True)
    print("runs (single stream ms | base tok/s | LoRA tok/s):")
    for name, values in runs.items():
        print(f"  {name:20s} " + " | ".join(", ".join(f"{v:.1f}" for v in values[key]) for key in values))


if __name__ == "__main__":
    main()
