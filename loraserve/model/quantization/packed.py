"""GPTQ, AWQ and compressed-tensors checkpoints: integers packed into int32 words, a scale (and zero point)
per group of input features. Each module's tensors are collected as they stream out of the checkpoint and
turned into one QuantizedTensor (layers/quantized.py), w[n, k] = (q[n, k] - z[n, g]) · s[n, g]; everything
else passes through unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from loraserve.layers.quantized import QuantizedTensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM kernel reads column 8c + AWQ_ORDER[i] from nibble i of word c


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned `bits`-bit fields of int32 words, little end first, spread along `dim` (int16 out). `order`:
    the field each position of a word holds, when not in sequence (AWQ)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32).unsqueeze(-1)
    fields = ((words >> shifts) & ((1 << bits) - 1)).to(torch.int16)  # [..., per_word]
    if order is not None:
        fields = fields[..., torch.tensor([order.index(i) for i in range(per_word)])]
    fields = fields.movedim(-1, dim + 1 if dim >= 0 else dim)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return fields.reshape(shape)


def to_quantized(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
                 g_idx: torch.Tensor | None, group_size: int) -> QuantizedTensor:
    """q [out, in] unsigned, zeros / scales [out, groups]; g_idx [in] the group of each input feature (act
    order), None when feature k is in group k // group_size."""
    cols = q.shape[1]
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(cols) // group_size):
        perm = torch.argsort(g_idx.long(), stable=True)
        counts = torch.bincount(g_idx.long(), minlength=scales.shape[1])
        if not bool((counts == group_size).all()):
            raise ValueError(f"g_idx puts {counts.tolist()} features in its groups; loraserve needs "
                             f"{group_size} in each (as GPTQ's act-order writes them)")
        q = q[:, perm]
    scales = scales.float()
    offsets = -zeros.float() * scales
    if bits == 8:  # unsigned 0..255 -> signed storage; the 128 moves into the offset
        q, offsets = q - 128, offsets + 128 * scales
    return QuantizedTensor.from_values(q, scales, offsets, group_size, signed=bits == 8, input_perm=perm)


@dataclass
class ModuleTensors:
    """The tensor suffixes that make one quantized module, and how to turn them into a QuantizedTensor."""

    required: tuple[str, ...]
    optional: tuple[str, ...]
    build: Callable[[dict[str, torch.Tensor]], QuantizedTensor]


def gather_modules(weights: Iterable[tuple[str, torch.Tensor]], spec: ModuleTensors,
                   what: str) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """Yield every plain tensor as it comes, then each module's '<module>.weight' QuantizedTensor (a
    checkpoint may list a module's tensors in any order, across files, so modules are built at the end;
    their packed tensors are no bigger than what they become)."""
    suffixes = spec.required + spec.optional
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, suffix = name.rpartition(".")
        if suffix in suffixes:
            pending.setdefault(module, {})[suffix] = tensor
        else:
            yield name, tensor
    for module in list(pending):
        parts = pending.pop(module)
        missing = sorted(set(spec.required) - set(parts))
        if missing:
            raise ValueError(f"{what} checkpoint: module {module} lacks {', '.join(missing)}")
        yield f"{module}.weight", spec.build(parts)
