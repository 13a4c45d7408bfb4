"""Quantized checkpoints: which scheme a model uses, and its weights as (name, tensor | QuantizedTensor).

Checkpoint schemes are read from the folder (config.json's quantization_config, or a GGUF file kept
quantized); int8 / int4 quantize a float checkpoint at load (Linear.quantize). Whatever the scheme, the
model computes with the weights quantized and adds LoRA on top in the LoRA dtype.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import PretrainedConfig

from loraserve.layers.quantizers import QUANTIZERS
from loraserve.model.loader import GGUF_WEIGHTS, iter_weights
from loraserve.model.quantization import awq, compressed_tensors, gptq
from loraserve.model.quantization.gguf import gguf_weights

CHECKPOINT_SCHEMES = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}
ON_THE_FLY = tuple(QUANTIZERS)
METHODS = (*CHECKPOINT_SCHEMES, "gguf", *ON_THE_FLY)


def quantization_config(config: PretrainedConfig) -> dict | None:
    """config.json's quantization_config (transformers keeps it as the dict it read)."""
    return getattr(config, "quantization_config", None)


def resolve_quantization(folder: Path, config: PretrainedConfig, requested: str | None) -> str | None:
    """The scheme to load `folder` (whose config is `config`) with: the checkpoint's own, or `requested`
    (int8 / int4) for a float one. Raises ValueError naming the scheme when it is unsupported or contradicts
    `requested`."""
    if (Path(folder) / GGUF_WEIGHTS).exists():
        return "gguf"
    qconfig = quantization_config(config)
    if qconfig is None:
        if requested in CHECKPOINT_SCHEMES:
            raise ValueError(f"quantization={requested!r}, but {folder} has no quantization_config: it is not a "
                             f"{requested} checkpoint. Leave quantization unset, or use int8 / int4 to quantize it "
                             f"at load")
        return requested
    method = str(qconfig.get("quant_method", "")).lower()
    if method not in CHECKPOINT_SCHEMES:
        raise ValueError(f"{folder} is quantized with {method!r}, which loraserve does not serve; supported "
                         f"checkpoint schemes: {', '.join(CHECKPOINT_SCHEMES)} (plus GGUF files with "
                         f"quantization='gguf', and int8 / int4 quantization of float models at load)")
    if requested not in (None, method):
        raise ValueError(f"{folder} is a {method} checkpoint; quantization={requested!r} cannot apply to it. Leave "
                         f"quantization unset (or set it to {method!r})")
    CHECKPOINT_SCHEMES[method].check(qconfig)
    return method


def checkpoint_weights(folder: Path, config: PretrainedConfig, method: str | None,
                       names: Iterable[str]) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors, quantized ones as QuantizedTensor; `names` are the model's checkpoint names."""
    if method == "gguf":
        return gguf_weights(Path(folder) / GGUF_WEIGHTS, config, names)
    if method in CHECKPOINT_SCHEMES:
        return CHECKPOINT_SCHEMES[method].weights(iter_weights(folder), quantization_config(config))
    return iter_weights(folder)
