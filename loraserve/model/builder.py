"""config.json + checkpoint folder -> a CausalLM of our own with the weights loaded."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from loraserve.model.llama import CausalLM
from loraserve.model.loader import iter_weights
from loraserve.model.registry import decoder_spec


def load_hf_config(folder: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(folder)


def build_model(folder: Path, config: PretrainedConfig, dtype: torch.dtype, device: torch.device,
                max_positions: int) -> CausalLM:
    """Allocate on the target device, load the checkpoint, cast the parameters once (the rotary tables
    are buffers and stay float32)."""
    spec = decoder_spec(config)
    with torch.device(device):
        model = CausalLM(spec, config, max_positions)
    model.load_weights(iter_weights(folder))
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.pack_weights()
    return model.eval()
