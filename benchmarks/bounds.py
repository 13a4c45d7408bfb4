"""Physical bounds measured on this machine, in the same run as the engine they bound:

- the matmul ceiling: every matmul of one decode step (each linear layer's weight and the LM head, with the
  model's own shapes) timed alone with the fastest matmul this machine offers for them -- torch's F.linear or
  the prepacked form the engine uses (oneDNN for bf16, MKL for fp32), whichever is faster in this run -- no
  attention, no norms, nothing else;
- memory bandwidth: reading a buffer far larger than the caches;
- the single-stream bound: the weight bytes one decode token must read, over that bandwidth;
- LoRA's bound: base step time / (base step time + adapter bytes read per step / bandwidth + LoRA FLOPs /
  the matmul rate).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from loraserve.layers.linear import Linear
from loraserve.layers.matmul import MatmulWeight


def decode_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every matmul one decode step runs: each (packed) linear layer, then the LM head."""
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear)]
    return shapes + [(model.spec.vocab_size, model.spec.hidden_size)]


def matmul_step_seconds(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Median time of every shape's matmul once (weights as large as the model's, so they stream from memory as
    the model's do) on `tokens` rows, in model order: the faster of F.linear and the engine's prepacked
    matmul (layers/matmul.MatmulWeight)."""
    weights = [torch.randn(out, inp, dtype=dtype) * 0.02 for out, inp in shapes]
    inputs = {inp: torch.randn(tokens, inp, dtype=dtype) for _, inp in shapes}
    candidates = {"F.linear": [lambda x, w=w: F.linear(x, w) for w in weights],
                  "prepacked": [MatmulWeight(w) for w in weights]}
    return min(_median_step(calls, shapes, inputs, repeats) for calls in candidates.values())


def _median_step(calls, shapes: list[tuple[int, int]], inputs: dict[int, torch.Tensor], repeats: int) -> float:
    with torch.inference_mode():
        for call, (_, inp) in zip(calls, shapes, strict=True):  # warm-up
            call(inputs[inp])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for call, (_, inp) in zip(calls, shapes, strict=True):
                call(inputs[inp])
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(shapes: list[tuple[int, int]], tokens: int) -> float:
    return 2.0 * tokens * sum(out * inp for out, inp in shapes)


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second read by a float32 sum over `gigabytes` (so every byte comes from DRAM)."""
    buffer = torch.ones(int(gigabytes * 2**30) // 4, dtype=torch.float32)
    buffer.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times)


def weight_bytes(shapes: list[tuple[int, int]], dtype: torch.dtype) -> int:
    return sum(out * inp for out, inp in shapes) * dtype.itemsize


def matmul_rate(shapes: list[tuple[int, int]], tokens: int, dtype: torch.dtype) -> float:
    """FLOP/s of the decode step's own matmuls at `tokens` rows."""
    return matmul_flops(shapes, tokens) / matmul_step_seconds(shapes, tokens, dtype)


def lora_bound(base_step_seconds: float, adapter_bytes: float, lora_flops: float, bandwidth: float,
               rate: float) -> float:
    """The best throughput ratio (LoRA / base) physics allows a step: its adapters' weights must be read
    once (bytes / bandwidth) and their FLOPs done at the matmul rate, on top of the base step."""
    return base_step_seconds / (base_step_seconds + adapter_bytes / bandwidth + lora_flops / rate)
