"""AWQ checkpoints (AutoAWQ's GEMM layout): qweight [in, out / 8] and qzeros [groups, out / 8] pack output
features into int32 words in AWQ's interleaved order; scales are [groups, out]."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from loraserve.layers.quantized import QuantizedTensor
from loraserve.model.quantization.packed import AWQ_ORDER, ModuleTensors, gather_modules, to_quantized, unpack_int32


def check(qconfig: dict) -> None:
    version = str(qconfig.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; loraserve reads AWQ's GEMM layout "
                         f"(version 'gemm'), the one AutoAWQ writes by default")
    bits = qconfig.get("bits", qconfig.get("w_bit"))
    if bits != 4:
        raise ValueError(f"AWQ with bits={bits} is not supported; AWQ checkpoints are 4-bit")


def weights(tensors: Iterable[tuple[str, torch.Tensor]], qconfig: dict) -> Iterator[tuple[str, object]]:
    group_size = qconfig.get("group_size", qconfig.get("q_group_size", 128))

    def build(parts: dict[str, torch.Tensor]) -> QuantizedTensor:
        q = unpack_int32(parts["qweight"], 4, dim=1, order=AWQ_ORDER).T  # [out, in]
        if "qzeros" in parts:
            zeros = unpack_int32(parts["qzeros"], 4, dim=1, order=AWQ_ORDER)
        else:  # zero_point=False: symmetric around 8
            zeros = torch.full(parts["scales"].shape, 8, dtype=torch.int16)
        group = q.shape[1] if group_size in (-1, None) else group_size
        return to_quantized(q, zeros.T, parts["scales"].T, 4, None, group)

    return gather_modules(tensors, ModuleTensors(("qweight", "scales"), ("qzeros",), build), "AWQ")
