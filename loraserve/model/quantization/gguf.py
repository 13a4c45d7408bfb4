"""A GGUF file's weights, kept quantized: each supported block type is unpacked into a QuantizedTensor (the
same integers, scales and minimums, regrouped; nothing is re-quantized), the rest read as float tensors.

Names and layout fixes follow transformers' own GGUF loader (the reference our parity tests use): gguf's
tensor name map from Hugging Face module names to `blk.N.*`, and transformers' tensor processors (Llama's
q/k rows are stored permuted for llama.cpp's rotary; Gemma 2/3 store norm weights plus one). A processor that
only reorders rows is applied to quantized rows as the same permutation; anything else a processor does to
a quantized tensor is refused by name. Routed experts stored fused ([experts, rows, cols]: ffn_gate_exps,
ffn_up_exps, ffn_down_exps) are split into one tensor per expert, still quantized.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from loraserve.layers.quantized import QuantizedTensor

QK_K = 256  # elements per K-quant super-block


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32)).squeeze(-1)


def _q4_0(blocks: np.ndarray) -> QuantizedTensor:  # d f16, 16 bytes of nibbles: x - 8, times d
    d = _f16(blocks[..., 0:2])
    return _packed_int4(blocks[..., 2:18], d, -8 * d)


def _q4_1(blocks: np.ndarray) -> QuantizedTensor:  # d f16, m f16, 16 bytes of nibbles: x·d + m
    return _packed_int4(blocks[..., 4:20], _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))


def _q8_0(blocks: np.ndarray) -> QuantizedTensor:  # d f16, 32 int8: q·d
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).astype(np.int16))
    return QuantizedTensor.from_values(q.flatten(1), _f16(blocks[..., 0:2]), None, 32, signed=True)


def _five_bit(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: nibbles (feature i low, i + 16 high) plus bit i of the 32-bit qh as the fifth bit."""
    high = np.ascontiguousarray(qh).view(np.uint32)  # [rows, blocks, 1]
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return (low | (bits << 4)).astype(np.int16)


def _q5_0(blocks: np.ndarray) -> QuantizedTensor:  # d f16, qh 4 bytes, qs 16 bytes: (x - 16)·d
    q = torch.from_numpy(_five_bit(blocks[..., 6:22], blocks[..., 2:6]) - 16)
    return QuantizedTensor.from_values(q.flatten(1), _f16(blocks[..., 0:2]), None, 32, signed=True)


def _q5_1(blocks: np.ndarray) -> QuantizedTensor:  # d f16, m f16, qh, qs: x·d + m
    q = torch.from_numpy(_five_bit(blocks[..., 8:24], blocks[..., 4:8]))
    return QuantizedTensor.from_values(q.flatten(1), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]), 32, signed=True)


def _k_scales(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per 32-feature sub-block, scale d·sc and offset -dmin·m (exact in float32)."""
    from gguf.quants import Q4_K

    rows, nb = blocks.shape[:2]
    sc, mins = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(rows * nb, 12))
    d, dmin = _f16(blocks[..., 0:2]).unsqueeze(-1), _f16(blocks[..., 2:4]).unsqueeze(-1)
    scales = d * torch.from_numpy(sc.astype(np.float32)).view(rows, nb, 8)
    offsets = -(dmin * torch.from_numpy(mins.astype(np.float32)).view(rows, nb, 8))
    return scales.flatten(1), offsets.flatten(1)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Sub-block 2c + h of a K-quant super-block is nibble h of bytes 32c .. 32c + 31."""
    rows, nb = qs.shape[:2]
    q = qs.reshape(rows, nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    return (q & 0xF).reshape(rows, nb, QK_K)


def _q4_k(blocks: np.ndarray) -> QuantizedTensor:  # d, dmin, 12 bytes of 6-bit scales / mins, 128 bytes qs
    scales, offsets = _k_scales(blocks)
    q = torch.from_numpy(_k_nibbles(blocks[..., 16:144]).astype(np.int16))
    return QuantizedTensor.from_values(q.flatten(1), scales, offsets, 32, signed=False)


def _q5_k(blocks: np.ndarray) -> QuantizedTensor:  # as Q4_K, plus 32 bytes qh: bit j of qh[l] tops sub-block j
    scales, offsets = _k_scales(blocks)
    rows, nb = blocks.shape[:2]
    qh = blocks[..., 16:48].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = _k_nibbles(blocks[..., 48:176]) | ((qh & 1).reshape(rows, nb, QK_K) << 4)
    return QuantizedTensor.from_values(torch.from_numpy(q.astype(np.int16)).flatten(1), scales, offsets, 32,
                                       signed=True)


def _q6_k(blocks: np.ndarray) -> QuantizedTensor:  # ql 128, qh 64, 16 int8 scales, d: (x - 32)·d·sc per 16
    rows, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    qh = blocks[..., 128:192].reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(
        1, 1, 1, 4, 1)
    # half n, quarter j of 32: low bits from nibble j // 2 of ql[n, 32 * (j % 2) + l], high bits 2j of qh[n, l]
    low = (ql & 0xF).reshape(rows, nb, 2, 4, 32)
    high = (qh & 3).reshape(rows, nb, 2, 4, 32)
    q = (low | (high << 4)).astype(np.int16) - 32
    d = _f16(blocks[..., 208:210]).unsqueeze(-1)
    sc = torch.from_numpy(np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32))
    return QuantizedTensor.from_values(torch.from_numpy(q).reshape(rows, nb * QK_K), (d * sc).flatten(1), None, 16,
                                       signed=True)


def _packed_int4(nibbles: np.ndarray, scales: torch.Tensor, offsets: torch.Tensor) -> QuantizedTensor:
    """Q4_0 / Q4_1 bytes are already loraserve's int4 layout (byte i: feature i low, i + 16 high)."""
    data = torch.from_numpy(np.ascontiguousarray(nibbles).reshape(nibbles.shape[0], -1))
    return QuantizedTensor.from_int4_chunks(data, scales, offsets, 32)


UNPACKERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
             "Q5_K": _q5_k, "Q6_K": _q6_k}
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_weights(path: Path, config: PretrainedConfig, names: Iterable[str]) -> Iterator[tuple[str, object]]:
    """(Hugging Face name, tensor or QuantizedTensor) for every tensor of the GGUF file at `path` that one of
    `names` (the model's checkpoint names) maps to."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = gguf.GGUFReader(str(path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    arch_key = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_key is None:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is unknown to the gguf package")
    name_map = gguf.get_tensor_name_map(arch_key, config.num_hidden_layers)
    to_hf, experts = {}, {}
    for name in names:
        module, _, suffix = name.rpartition(".")
        if module.endswith(".experts") and suffix in ("gate_up_proj", "down_proj"):  # fused in transformers
            for part in ("gate_proj", "up_proj") if suffix == "gate_up_proj" else ("down_proj",):
                gguf_name = name_map.get_name(f"{module}.{part}")  # blk.N.ffn_gate_exps, ...
                if gguf_name is not None:
                    experts[f"{gguf_name}.weight"] = (module, part)
            continue
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            to_hf[f"{gguf_name}.{suffix}"] = name
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    for tensor in reader.tensors:
        if tensor.name in experts:
            yield from _expert_tensors(path, tensor, *experts[tensor.name])
            continue
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            if "_exps" in tensor.name:
                raise ValueError(f"{path}: tensor {tensor.name} holds routed experts, but the model's config "
                                 f"({config.model_type}) has none; serve the model's Hugging Face checkpoint "
                                 f"instead (quantization='int4' / 'int8' keeps it small)")
            continue  # e.g. rope_freqs: computed from the config instead
        values = _read(path, tensor)
        if isinstance(values, QuantizedTensor):
            yield hf_name, _reorder_rows(values, processor, tensor.name)
        else:
            yield hf_name, torch.from_numpy(np.array(processor.process(values, tensor.name).weights))


def _read(path: Path, tensor) -> np.ndarray | QuantizedTensor:
    """A float tensor as an array of its Hugging Face shape, or a quantized one as a QuantizedTensor of its
    rows (a 3-D tensor's first two dimensions flattened into rows)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind in FLOAT_TYPES:
        return gguf.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
    if kind not in UNPACKERS:
        raise ValueError(f"{path}: tensor {tensor.name} is {kind}, which loraserve cannot keep quantized; "
                         f"supported GGUF types: {', '.join((*UNPACKERS, *FLOAT_TYPES))} (or load the file "
                         f"without quantization='gguf' to de-quantize it)")
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
    return UNPACKERS[kind](np.asarray(tensor.data).reshape(rows, -1, block_bytes))


def _expert_tensors(path: Path, tensor, module: str, part: str) -> Iterator[tuple[str, object]]:
    """A fused GGUF expert tensor ([experts, rows, cols]: ffn_gate_exps, ffn_up_exps, ffn_down_exps) as one
    tensor per expert, named as a per-expert checkpoint names it (module.E.gate_proj.weight), still quantized:
    the values are the file's (transformers only splits and stacks them)."""
    experts, rows = int(tensor.shape[2]), int(tensor.shape[1])
    values = _read(path, tensor)
    for e in range(experts):
        name = f"{module}.{e}.{part}.weight"
        if isinstance(values, QuantizedTensor):
            yield name, values.take_rows(torch.arange(e * rows, (e + 1) * rows))
        else:
            yield name, torch.from_numpy(np.ascontiguousarray(values[e]))


def _reorder_rows(quantized: QuantizedTensor, processor, gguf_name: str) -> QuantizedTensor:
    """Apply the processor to the row order: a permutation of rows is applied to the quantized rows."""
    index = np.arange(quantized.rows, dtype=np.float64).reshape(-1, 1)
    moved = np.asarray(processor.process(index, gguf_name).weights).reshape(-1)
    if moved.shape == (quantized.rows,) and np.array_equal(np.sort(moved), index.reshape(-1)):
        if np.array_equal(moved, index.reshape(-1)):
            return quantized
        return quantized.take_rows(torch.from_numpy(moved.astype(np.int64)))
    raise ValueError(f"GGUF tensor {gguf_name}: transformers changes its values on load, not only its row order, "
                     f"so it cannot stay quantized")
