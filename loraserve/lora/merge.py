"""Fold an adapter into the base weights (W = W₀ + scale·B·A) and save a plain model folder, for serving
one adapter with no LoRA cost at all."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.lora.adapter import LoRATargetSpec, load_adapter
from loraserve.lora_request import LoRARequest
from loraserve.model.builder import load_hf_config
from loraserve.model.llama import CausalLM
from loraserve.model.loader import iter_weights, resolve_model
from loraserve.model.registry import decoder_spec

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def target_spec(folder: Path, model_name: str) -> LoRATargetSpec:
    """The model's adaptable modules, from its architecture alone (built on the meta device: no memory)."""
    config = load_hf_config(folder)
    with torch.device("meta"):
        model = CausalLM(decoder_spec(config), config, max_positions=1)
    return LoRATargetSpec.of_linears(model.linear_modules(), model_name)


def merge_adapter(model: str | None, adapter_path: str, out_dir: str | Path) -> Path:
    """Write `model` with the adapter merged into `out_dir` (config, tokenizer, one safetensors file).
    The sum is computed in float32 and stored in each tensor's original dtype."""
    folder = resolve_model(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new output folder")
    spec = target_spec(folder, str(model or folder))
    adapter = load_adapter(LoRARequest("merge", 1, adapter_path), spec, max_lora_rank=2**16, dtype=torch.float32)
    merged = {}
    for name, tensor in iter_weights(folder):
        module = name.removesuffix(".weight")
        weights = adapter.modules.get(module)
        if weights is not None and name.endswith(".weight"):
            tensor = (tensor.float() + weights.lora_b @ weights.lora_a).to(tensor.dtype)
        merged[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in folder.iterdir():
        if item.is_file() and item.name not in _WEIGHT_FILES and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy2(item, out / item.name)
    return out
