"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum): qweight packs input features into int32 words along
dim 0, qzeros packs output features along dim 1, scales are [groups, out], g_idx maps features to groups."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from loraserve.layers.quantized import QuantizedTensor
from loraserve.model.quantization.packed import ModuleTensors, gather_modules, to_quantized, unpack_int32

BITS = (4, 8)
FORMATS = ("gptq", "gptq_v2")


def check(qconfig: dict) -> None:
    bits = qconfig.get("bits")
    if bits not in BITS:
        raise ValueError(f"GPTQ with bits={bits} is not supported; loraserve serves GPTQ with bits 4 or 8")
    fmt = qconfig.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (supported: {', '.join(FORMATS)}); "
                         f"re-save the model in the plain GPTQ format")
    if qconfig.get("dynamic"):
        raise ValueError("GPTQ 'dynamic' per-module overrides are not supported; quantize every module alike")


def weights(tensors: Iterable[tuple[str, torch.Tensor]], qconfig: dict) -> Iterator[tuple[str, object]]:
    bits, group_size = qconfig["bits"], qconfig.get("group_size", -1)
    v1 = qconfig.get("checkpoint_format", "gptq") == "gptq"  # v1 stores every zero point minus one

    def build(parts: dict[str, torch.Tensor]) -> QuantizedTensor:
        q = unpack_int32(parts["qweight"], bits, dim=0).T  # [out, in]
        zeros = unpack_int32(parts["qzeros"], bits, dim=1)[:, :q.shape[0]] + int(v1)  # [groups, out]
        group = q.shape[1] if group_size in (-1, None) else group_size
        return to_quantized(q, zeros.T, parts["scales"].T, bits, parts.get("g_idx"), group)

    return gather_modules(tensors, ModuleTensors(("qweight", "qzeros", "scales"), ("g_idx",), build), "GPTQ")
