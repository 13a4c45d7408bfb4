"""Quantizing a float weight at load (quantization="int8" / "int4"), calibration-free.

Round-to-nearest over a group's min..max range loses most of a small model: one outlier stretches the
group's step for all the others (per-row int8 kept 0.48 of greedy tokens on the default model, groups of 64 of
int4 0.18). Three things fix that, all from the weights alone:

- groups: int8 has a scale per `group` input features too, not one per row;
- the range: each group's quantization range is searched over clipped ranges, keeping the one with the least
  squared error (an outlier is clipped when that costs less than coarsening every other weight), then the
  scale and offset are refitted by least squares to the integers chosen, and the integers re-rounded, while
  that lowers the error (the refit of llama.cpp's k-quants; AWQ searches the clip the same way, with data);
- the group size (int4), per layer: of 128, 64 and 32, the one with the least error for its bytes, each bit
  a weight worth a quarter of the squared error (what one more bit of every weight would buy): 128 for
  well-behaved weights, smaller groups where outliers make 128's error grow faster than its saving (or where
  the weights came from a finer grid, such as a de-quantized GGUF's groups of 32).

Scales and offsets are float16, as in GPTQ / AWQ checkpoints; the error is measured with them rounded.
"""
from __future__ import annotations

import torch

from loraserve.layers.quantized import QuantizedTensor

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # the range's ends times each, toward zero
REFITS = 2
GROUP_SIZES = (128, 64, 32)
ROWS_PER_CHUNK = 1024
HALF_SMALLEST_NORMAL = 2.0**-14  # the search holds a few float copies of this many rows at once


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Symmetric int8 per group of input features (128 where the width allows, else 64 / 32 / the row)."""
    group_size = group_size or next((g for g in GROUP_SIZES if weight.shape[1] % g == 0), weight.shape[1])
    return _quantize(weight, group_size, bits=8)


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Asymmetric int4 (unsigned 0..15, float16 scale and offset) per group; the group size chosen per layer
    by its error when not given."""
    if group_size is not None:
        return _quantize(weight, group_size, bits=4)
    sizes = [g for g in GROUP_SIZES if weight.shape[1] % g == 0] or [weight.shape[1]]
    fits = [_quantize(weight, g, bits=4) for g in sizes]  # largest group first: it wins ties

    def cost(q: QuantizedTensor) -> float:  # squared error x 4^(bits per weight)
        return _squared_error(weight, q) * 4.0 ** (8 * q.nbytes / weight.numel())
    return min(fits, key=cost)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def _squared_error(weight: torch.Tensor, q: QuantizedTensor) -> float:
    return float((q.dequantize() - weight.float()).pow(2).sum())


def _quantize(weight: torch.Tensor, group_size: int, bits: int) -> QuantizedTensor:
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"a {rows}x{cols} weight cannot be split into groups of {group_size}")
    # float16 scales where every group's step stays a normal float16 (else float16 would round small steps
    # coarsely: a layer of tiny weights keeps float32 scales)
    steps = weight.float().abs().view(rows, -1, group_size).amax(dim=-1) / (127 if bits == 8 else 7.5)
    half = float(steps.min()) * min(CLIP_RATIOS) >= HALF_SMALLEST_NORMAL
    fitted = [_fit(chunk.float().view(chunk.shape[0], -1, group_size), bits, half)
              for chunk in weight.split(ROWS_PER_CHUNK)]
    q, scales, offsets = (torch.cat(parts) for parts in zip(*fitted, strict=True))
    q = q.view(rows, cols)
    if bits == 8:
        return QuantizedTensor.from_values(q, scales, None, group_size, signed=True)
    return QuantizedTensor.from_values(q, scales, offsets, group_size, signed=False)


def _fit(groups: torch.Tensor, bits: int, half: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups [rows, n, size] -> integers [rows, n, size], scales and offsets [rows, n] (float16 values when
    `half`; the offsets zero for symmetric int8): the clip search, then the least-squares refits."""
    symmetric = bits == 8
    if symmetric:
        top = groups.abs().amax(dim=-1)
        low, high, levels, first = -top, top, 127, -127
    else:
        low, high, levels, first = groups.amin(dim=-1), groups.amax(dim=-1), 15, 0
    best = None
    for ratio in CLIP_RATIOS:
        span = (high - low) * ratio
        scale = span / (2 * levels if symmetric else levels)
        offset = torch.zeros_like(scale) if symmetric else low * ratio
        best = _keep_better(best, _round(groups, scale, offset, first, levels, half))
    for _ in range(REFITS):
        scale, offset = _least_squares(groups, best[0], symmetric)
        best = _keep_better(best, _round(groups, scale, offset, first, levels, half))
    q, scale, offset, _ = best
    return q, scale, offset


def _round(groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, first: int, levels: int,
           half: bool) -> tuple[torch.Tensor, ...]:
    """Integers for `groups` on the grid offset + q·scale (both rounded as stored), and each group's squared
    error."""
    scale = scale.clamp(min=HALF_SMALLEST_NORMAL if half else 1e-30)
    if half:
        scale, offset = scale.to(torch.float16).float(), offset.to(torch.float16).float()
    q = torch.round((groups - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(first, levels)
    error = (q * scale.unsqueeze(-1) + offset.unsqueeze(-1) - groups).pow(2).sum(dim=-1)
    return q, scale, offset, error


def _keep_better(best: tuple | None, candidate: tuple) -> tuple:
    """Per group, whichever of the two has the smaller error."""
    if best is None:
        return candidate
    better = candidate[3] < best[3]
    return (torch.where(better.unsqueeze(-1), candidate[0], best[0]),
            *(torch.where(better, c, b) for c, b in zip(candidate[1:], best[1:], strict=True)))


def _least_squares(groups: torch.Tensor, q: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale (and offset) minimising Σ (q·s + o - w)² for fixed integers q, per group."""
    if symmetric:
        scale = (q * groups).sum(-1) / q.pow(2).sum(-1).clamp(min=1)
        return scale, torch.zeros_like(scale)
    n = groups.shape[-1]
    sq, sw = q.sum(-1), groups.sum(-1)
    var = n * q.pow(2).sum(-1) - sq * sq
    scale = (n * (q * groups).sum(-1) - sq * sw) / var.clamp(min=1e-12)
    flat = var <= 0  # every integer equal: the offset alone carries the group
    scale = torch.where(flat, torch.zeros_like(scale), scale)  # _round lifts it to its smallest step
    offset = (sw - scale * sq) / n
    return scale, offset
