"""compressed-tensors checkpoints in the pack-quantized format (llm-compressor's W4A16 / W8A16):
weight_packed [out, in · bits / 32] packs input features into int32 words, values stored plus 2^(bits-1);
weight_scale [out, groups]; weight_zero_point (asymmetric only) packed along the output features."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from loraserve.layers.quantized import QuantizedTensor
from loraserve.model.quantization.packed import ModuleTensors, gather_modules, to_quantized, unpack_int32

FORMAT = "pack-quantized"
STRATEGIES = ("group", "channel")


def check(qconfig: dict) -> None:
    groups = qconfig.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for name, group in groups.items():
        fmt = group.get("format") or qconfig.get("format")
        if fmt != FORMAT:
            raise ValueError(f"compressed-tensors format {fmt!r} (config group {name}) is not supported; "
                             f"loraserve reads {FORMAT!r} (W4A16 / W8A16 as llm-compressor writes them)")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"compressed-tensors config group {name} quantizes activations; loraserve serves "
                             f"weight-only schemes (W4A16, W8A16) with activations in the model dtype")
        weights_args = group.get("weights") or {}
        bits, kind, strategy = weights_args.get("num_bits"), weights_args.get("type"), weights_args.get("strategy")
        if kind != "int" or bits not in (4, 8) or strategy not in STRATEGIES:
            raise ValueError(f"compressed-tensors weights {kind} {bits}-bit with strategy {strategy!r} (config "
                             f"group {name}) are not supported; supported: int 4 / 8-bit, strategy "
                             f"{' or '.join(STRATEGIES)}")


def weights(tensors: Iterable[tuple[str, torch.Tensor]], qconfig: dict) -> Iterator[tuple[str, object]]:
    def build(parts: dict[str, torch.Tensor]) -> QuantizedTensor:
        rows, cols = (int(v) for v in parts["weight_shape"].tolist())
        packed = parts["weight_packed"]
        bits = next((b for b in (4, 8) if packed.shape[1] == -(-cols * b // 32)), None)
        if bits is None:
            raise ValueError(f"compressed-tensors weight_packed {tuple(packed.shape)} fits neither 4 nor 8 bits "
                             f"for a {rows}x{cols} weight")
        q = unpack_int32(packed, bits, dim=1)[:, :cols]
        scales = parts["weight_scale"].reshape(rows, -1)
        zero_point = parts.get("weight_zero_point")
        if zero_point is None:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int16)
        elif zero_point.dtype == torch.int32 and zero_point.shape[0] != rows:  # packed along the output rows
            zeros = unpack_int32(zero_point, bits, dim=0)[:rows]
        else:
            zeros = zero_point.reshape(rows, -1).to(torch.int16) + (1 << (bits - 1))
        group = cols // scales.shape[1]
        return to_quantized(q, zeros, scales, bits, parts.get("weight_g_idx"), group)

    spec = ModuleTensors(("weight_packed", "weight_scale", "weight_shape"), ("weight_zero_point", "weight_g_idx"),
                         build)
    return gather_modules(tensors, spec, "compressed-tensors")
