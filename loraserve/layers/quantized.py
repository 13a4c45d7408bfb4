"""Weights held quantized in memory, and the matmul that computes with them.

Every format loraserve reads (GPTQ, AWQ, compressed-tensors, GGUF, on-the-fly int8/int4) is turned into one
form at load: integers with a scale, and optionally an offset, per group of `group_size` input features,

    w[n, k] = q[n, k] · scales[n, k // group_size] + offsets[n, k // group_size],

q int4 (unsigned 0..15) or int8 (signed). Integer zero points fold into the offset exactly (offset = -z·s in
float32: s has at most 17 significant bits and z at most 9, so the product is exact, and so is q·s + offset,
which is the exact (q - z)·s). Scales and offsets are kept as float16 where that loses nothing (GGUF's and
GPTQ's scales are float16 to begin with), else float32. Act-order checkpoints (GPTQ desc_act) are stored
with their input features sorted by group; `input_perm` says which input feature each column is.

The matmul de-quantizes on the fly: on a CPU with AVX512-BF16 a C++ kernel (csrc/quant_matmul.cpp) multiplies
a few tokens' activations straight into each row's integers, or, for more tokens, turns a tile of rows into
bf16 in cache and runs every token against it; float32 activations take the same paths in float arithmetic.
Anywhere else (other devices, float16) the weight is de-quantized to the activation dtype and handed to
F.linear, the reference the kernel is tested against.
LoRA is never merged into these weights: Linear adds it on top in the LoRA dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from loraserve.layers.cpu_kernels import cpu_kernel, quant_module

CHUNK = 32  # int4 packs features in chunks of 32: byte i holds feature i (low nibble) and i + 16 (high)


@dataclass
class QuantizedTensor:
    """A [rows, cols] weight: `data` uint8 [rows, cols // 2] (bits 4) or int8 [rows, cols] (bits 8)."""

    bits: int
    data: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int
    cols: int
    input_perm: torch.Tensor | None = None

    @classmethod
    def from_values(cls, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                    *, signed: bool, input_perm: torch.Tensor | None = None) -> QuantizedTensor:
        """q: integer values [rows, cols], unsigned 0..15 (int4, signed=False) or within int8 (signed=True, or
        unsigned values below 128); scales / offsets [rows, cols // group_size]. Int4 values are packed two to
        a byte when cols is a multiple of 32, else kept one to a byte."""
        rows, cols = q.shape
        _check_groups(rows, cols, scales, group_size)
        q = q.to(torch.int16)
        four_bit = not signed and int(q.min()) >= 0 and int(q.max()) <= 15
        if four_bit and cols % CHUNK == 0:
            chunks = q.view(rows, cols // CHUNK, 2, CHUNK // 2).to(torch.uint8)
            data = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(rows, cols // 2)
            bits = 4
        else:
            if int(q.min()) < -128 or int(q.max()) > 127:
                raise ValueError("quantized values do not fit in int8")
            data, bits = q.to(torch.int8), 8
        scales, offsets = _narrow(scales, offsets)
        return cls(bits, data.contiguous(), scales, offsets, group_size, cols, input_perm)

    @classmethod
    def from_int4_chunks(cls, data: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                         group_size: int) -> QuantizedTensor:
        """Int4 already in this layout (uint8 [rows, cols // 2]; GGUF's Q4_0 / Q4_1 bytes are)."""
        rows, cols = data.shape[0], data.shape[1] * 2
        _check_groups(rows, cols, scales, group_size)
        scales, offsets = _narrow(scales, offsets)
        return cls(4, data.to(torch.uint8).contiguous(), scales, offsets, group_size, cols)

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        tensors = (self.data, self.scales, self.offsets, self.input_perm)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def values(self) -> torch.Tensor:
        """The integers q, [rows, cols] int16, columns in storage order."""
        if self.bits == 8:
            return self.data.to(torch.int16)
        packed = self.data.view(self.rows, self.cols // CHUNK, CHUNK // 2)
        return torch.cat([packed & 0xF, packed >> 4], dim=-1).reshape(self.rows, self.cols).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or the given rows of it) in float32, rounded once to `dtype`, columns in input order."""
        picked = self if rows is None else self.take_rows(rows)
        w = picked.values().float().view(picked.rows, -1, self.group_size)
        w = w * picked.scales.float().unsqueeze(-1)
        if picked.offsets is not None:
            w = w + picked.offsets.float().unsqueeze(-1)
        w = w.view(picked.rows, self.cols)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w.to(dtype)

    def take_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The rows `index` (a row permutation or selection), still quantized."""
        return replace(self, data=self.data[index], scales=self.scales[index],
                       offsets=None if self.offsets is None else self.offsets[index])

    def to(self, device: torch.device) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, data=move(self.data), scales=move(self.scales), offsets=move(self.offsets),
                       input_perm=move(self.input_perm))

    def stacks_with(self, other: QuantizedTensor) -> bool:
        same_perm = (self.input_perm is None and other.input_perm is None) or (
            self.input_perm is not None and other.input_perm is not None
            and torch.equal(self.input_perm, other.input_perm))
        return (self.bits, self.group_size, self.cols, self.offsets is None) == (
            other.bits, other.group_size, other.cols, other.offsets is None) and same_perm

    @staticmethod
    def stack(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Row-wise concatenation of parts that `stacks_with` each other (packed q/k/v, gate/up)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        wide = any(p.scales.dtype == torch.float32 for p in parts)
        cat = lambda ts: torch.cat([t.float() if wide else t for t in ts])  # noqa: E731
        return replace(first, data=torch.cat([p.data for p in parts]), scales=cat([p.scales for p in parts]),
                       offsets=None if first.offsets is None else cat([p.offsets for p in parts]))


def _check_groups(rows: int, cols: int, scales: torch.Tensor, group_size: int) -> None:
    if cols % group_size or scales.shape != (rows, cols // group_size):
        raise ValueError(f"quantized weight {rows}x{cols}: scales {tuple(scales.shape)} do not fit groups of "
                         f"{group_size}")


def _narrow(scales: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both in float16 when that holds every value exactly, else both in float32 (the kernel reads one type)."""
    full = [t.float().contiguous() for t in (scales, offsets) if t is not None]
    half = [t.to(torch.float16) for t in full]
    exact = all(torch.equal(h.float(), t) for h, t in zip(half, full, strict=True))
    chosen = half if exact else full
    return chosen[0], (chosen[1] if offsets is not None else None)


class QuantizedMatmul:
    """y = x Wᵀ + b for a layer whose parts (q/k/v, gate/up) are quantized. Parts that share a layout are
    stacked into one weight; parts that do not (act-order parts sorted differently) each get a matmul and
    the outputs are concatenated."""

    def __init__(self, parts: list[QuantizedTensor]) -> None:
        groups: list[list[QuantizedTensor]] = []
        for part in parts:
            if groups and groups[-1][0].stacks_with(part):
                groups[-1].append(part)
            else:
                groups.append([part])
        self.weights = [QuantizedTensor.stack(group) for group in groups]
        self.out_features = sum(w.rows for w in self.weights)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.weights) == 1:
            return _matmul(x, self.weights[0], bias)
        outs, start = [], 0
        for w in self.weights:
            outs.append(_matmul(x, w, None if bias is None else bias[start:start + w.rows]))
            start += w.rows
        return torch.cat(outs, dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights)


def _matmul(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    kernel = _kernel_for(x, w)
    if kernel is None:
        return F.linear(x, w.dequantize(x.dtype), bias)
    flat = x if x.dim() == 2 else x.reshape(-1, w.cols)  # the engine's activations are 2-D already
    if w.input_perm is not None:
        flat = flat.index_select(1, w.input_perm)
    y = kernel.quant_matmul(flat, w.data, w.bits, w.group_size, w.scales, w.offsets, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.rows)


def _kernel_for(x: torch.Tensor, w: QuantizedTensor):
    if w.cols % CHUNK or w.group_size % 16 or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    # float32 too, unlike the dense fused kernels: PyTorch's path here de-quantizes the whole weight every call
    # (20x slower), while the kernel's float path is exact to float32 rounding
    module = cpu_kernel(quant_module, x, any_dtype=True)
    return module if module is not None and module.available else None
