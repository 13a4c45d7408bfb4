"""Quantizing a float weight at load (quantization="int8" / "int4"), calibration-free.

Round-to-nearest over a group's min..max range loses most of a small model: one outlier stretches the
group's step for all the others (per-row int8 kept 0.48 of greedy tokens on the default model, groups of 64 of
int4 0.18). Three things fix that, all from the weights alone:

- groups: int8 has a scale per group of input features too, not one per row, and may take an offset;
- the range: each group's quantization range is searched over clipped ranges, keeping the one with the least
  squared error (an outlier is clipped when that costs less than coarsening every other weight); then, twice,
  the scale and offset are refitted by least squares to the integers chosen and the integers re-rounded, each
  group keeping the better (the refit of llama.cpp's k-quants; AWQ searches the clip the same way, with data);
- the grid, per layer: group size 128, 64 or 32 (int8 also symmetric or with an offset), the one with the
  least error for its bytes, each bit a weight worth a quarter of the squared error (what one more bit of
  every weight would buy): 128 for well-behaved weights, smaller groups where outliers make 128's error grow
  faster than its saving, or where the weights came from a finer grid (a de-quantized GGUF's groups of 32,
  which int4 and int8 with offsets then hold exactly). The choice is made on a sample of the rows, so
  quantizing costs about one search over the weight.

Scales and offsets are float16, as in GPTQ / AWQ checkpoints (float32 for a layer whose steps are too small
for float16's normal range); every error is measured with them rounded as stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.quantized import QuantizedTensor

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # the range's ends times each, toward zero
REFITS = 2
GROUP_SIZES = (128, 64, 32)
SAMPLE_ROWS = 256  # rows the grid is chosen on
ROWS_PER_CHUNK = 1024  # the search holds a few float copies of this many rows at once
HALF_SMALLEST_NORMAL = 2.0**-14


@dataclass(frozen=True)
class Grid:
    """Integers first..last, w = q·scale + offset per group of `group` input features (offset 0 when
    symmetric)."""

    bits: int
    group: int
    symmetric: bool

    @property
    def first(self) -> int:
        return -127 if self.symmetric else (-128 if self.bits == 8 else 0)

    @property
    def last(self) -> int:
        return 127 if self.bits == 8 else 15


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Int8 per group of input features, float16 scales: symmetric when `group_size` is given, else the grid
    (group size, symmetric or with an offset) chosen per layer by its error."""
    if group_size:
        return _quantize(weight, Grid(8, group_size, symmetric=True))
    return _best(weight, [Grid(8, g, sym) for g in _group_sizes(weight) for sym in (True, False)])


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> QuantizedTensor:
    """Int4 (unsigned 0..15, float16 scale and offset) per group; the group size chosen per layer by its error
    when not given."""
    sizes = [group_size] if group_size else _group_sizes(weight)
    return _best(weight, [Grid(4, g, symmetric=False) for g in sizes])


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def _group_sizes(weight: torch.Tensor) -> list[int]:
    return [g for g in GROUP_SIZES if weight.shape[1] % g == 0] or [weight.shape[1]]


def _best(weight: torch.Tensor, grids: list[Grid]) -> QuantizedTensor:
    """`weight` on the grid with the least squared error times 4^(bits per weight, scales and offsets
    counted), judged on evenly spaced rows (the first grid wins ties: the cheapest)."""
    if len(grids) > 1:
        sample = weight[torch.linspace(0, weight.shape[0] - 1, min(SAMPLE_ROWS, weight.shape[0])).long()]

        def cost(grid: Grid) -> float:
            q = _quantize(sample, grid)
            return float((q.dequantize() - sample.float()).pow(2).sum()) * 4.0 ** (8 * q.nbytes / sample.numel())
        grids = [min(grids, key=cost)]
    return _quantize(weight, grids[0])


def _quantize(weight: torch.Tensor, grid: Grid) -> QuantizedTensor:
    rows, cols = weight.shape
    if cols % grid.group:
        raise ValueError(f"a {rows}x{cols} weight cannot be split into groups of {grid.group}")
    # float16 scales where every group's step stays a normal float16 (else float16 would round small steps
    # coarsely: a layer of tiny weights keeps float32 scales)
    steps = weight.abs().view(rows, -1, grid.group).amax(dim=-1).float() / (grid.last - grid.first) * 2
    half = float(steps.min()) * min(CLIP_RATIOS) >= HALF_SMALLEST_NORMAL
    fitted = [_fit(chunk.float().view(chunk.shape[0], -1, grid.group), grid, half)
              for chunk in weight.split(ROWS_PER_CHUNK)]
    q, scales, offsets = (torch.cat(parts) for parts in zip(*fitted, strict=True))
    return QuantizedTensor.from_values(q.view(rows, cols), scales, None if grid.symmetric else offsets, grid.group,
                                       signed=grid.bits == 8)


def _fit(groups: torch.Tensor, grid: Grid, half: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups [rows, n, size] -> integers [rows, n, size], scales and offsets [rows, n] (float16 values when
    `half`): the clip search, then the least-squares refits."""
    if grid.symmetric:
        high = groups.abs().amax(dim=-1)
        low = -high
    else:
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    best = None
    for ratio in CLIP_RATIOS:
        scale = (high - low) * ratio / (grid.last - grid.first)
        offset = torch.zeros_like(scale) if grid.symmetric else low * ratio - grid.first * scale
        best = _keep_better(best, _round(groups, scale, offset, grid, half))
    for _ in range(REFITS):
        scale, offset = _least_squares(groups, best[0], grid.symmetric)
        best = _keep_better(best, _round(groups, scale, offset, grid, half))
    q, scale, offset, _ = best
    return q, scale, offset


def _round(groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, grid: Grid,
           half: bool) -> tuple[torch.Tensor, ...]:
    """Integers for `groups` on the grid offset + q·scale (both rounded as stored), and each group's squared
    error."""
    scale = scale.clamp(min=HALF_SMALLEST_NORMAL if half else 1e-30)
    if half:
        scale, offset = scale.to(torch.float16).float(), offset.to(torch.float16).float()
    q = torch.round((groups - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(grid.first, grid.last)
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
