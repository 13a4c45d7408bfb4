"""config.json + checkpoint folder -> a CausalLM of our own with the weights loaded."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from loraserve.model.causal_lm import CausalLM
from loraserve.model.decoder import DecoderForCausalLM
from loraserve.model.gpt_bigcode import GPTBigCodeForCausalLM
from loraserve.model.native_configs import native_config
from loraserve.model.quantization import ON_THE_FLY, checkpoint_weights
from loraserve.model.registry import ARCHITECTURES, decoder_spec

FAMILIES: dict[str, type[CausalLM]] = {"decoder": DecoderForCausalLM, "gpt_bigcode": GPTBigCodeForCausalLM}


def load_hf_config(folder: Path) -> PretrainedConfig:
    """The folder's config. A model whose modelling code ships with the checkpoint (config.json's auto_map:
    InternLM...) is refused before transformers asks for trust_remote_code: loraserve runs no checkpoint code,
    and that code could not be fetched here anyway. Those served natively (Baichuan 7B, ChatGLM2/3, GLM-4) have
    their config read from config.json's keys (model/native_configs.py)."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    native = native_config(raw)
    if native is not None:
        return native
    archs = raw.get("architectures") or []
    if raw.get("auto_map") and not any(arch in ARCHITECTURES for arch in archs):
        name = ", ".join(archs) or raw.get("model_type", "this model")
        raise ValueError(f"{name} needs the modelling code that ships with its checkpoint (auto_map / "
                         f"trust_remote_code); loraserve runs no checkpoint code. Supported architectures: "
                         f"{', '.join(ARCHITECTURES)}")
    return AutoConfig.from_pretrained(folder)


def model_skeleton(config: PretrainedConfig, max_positions: int, rope_factors: tuple[float, ...] = (1.0,)) -> CausalLM:
    """Our model for the config's architecture, its parameters uninitialised (on the current device);
    `rope_factors`: the linear RoPE factors tokens may be rotated with (1: the model's own; more for
    long-context adapters)."""
    spec = decoder_spec(config)
    return FAMILIES[spec.family](spec, config, max_positions, rope_factors)


def build_model(folder: Path, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int, quantization: str | None = None,
                rope_factors: tuple[float, ...] = (1.0,)) -> CausalLM:
    """Allocate on the target device in `dtype` (the rotary tables stay float32), load the checkpoint tensor by
    tensor (quantized tensors stay quantized; int8 / int4 quantize each float linear weight as it arrives), then
    pack. No float copy of the whole model exists at any point, so a quantized model's resident memory is its
    quantized size. `quantization` is resolve_quantization's answer."""
    with torch.device(device), _default_dtype(dtype):
        model = model_skeleton(config, max_positions, rope_factors)
    on_the_fly = quantization if quantization in ON_THE_FLY else None
    model.load_weights(checkpoint_weights(folder, config, quantization, model.checkpoint_names()), on_the_fly)
    model.pack_weights()
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters made inside are `dtype` (PyTorch has no per-call default; this one is restored on exit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
