"""Fold an adapter into the base weights (W = W₀ + scale·B·A) and save a plain model folder, for serving
one adapter with no LoRA cost at all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.layers.quantized import QuantizedTensor
from loraserve.lora.adapter import LoRATargetSpec, load_adapter
from loraserve.lora_request import LoRARequest
from loraserve.model.builder import load_hf_config, model_skeleton
from loraserve.model.loader import resolve_model
from loraserve.model.quantization import checkpoint_weights, resolve_quantization

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def merge_adapter(model: str | None, adapter_path: str, out_dir: str | Path, dequantize: bool = False) -> Path:
    """Write `model` with the adapter merged into `out_dir` (config, tokenizer, one safetensors file).
    The sum is computed in float32 and stored in each tensor's original dtype. A quantized base (GPTQ, AWQ,
    compressed-tensors) is refused: merging into it would re-quantize the adapter away. With `dequantize`
    its weights are de-quantized and the merged model is written in float (config.json's dtype, else fp16).
    (A .gguf base is de-quantized on load, as serving it without quantization='gguf' does.)"""
    folder = resolve_model(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new output folder")
    config = load_hf_config(folder)
    scheme = resolve_quantization(folder, config, None)
    if scheme is not None and not dequantize:
        raise ValueError(f"{folder} is a {scheme} checkpoint: a LoRA adapter cannot be merged into quantized weights "
                         f"without re-quantizing it away. Serve it with the adapter instead (LoRA runs on top of "
                         f"the quantized base), or pass --dequantize to write a de-quantized float model with the "
                         f"adapter merged")
    float_dtype = _float_dtype(config)
    with torch.device("meta"):  # the architecture alone: its adaptable modules and checkpoint names, no memory
        skeleton = model_skeleton(config, max_positions=1)
    spec = LoRATargetSpec.of_model(skeleton, str(model or folder))
    adapter = load_adapter(LoRARequest("merge", 1, adapter_path), spec, max_lora_rank=2**16, dtype=torch.float32)
    experts = [module for module in adapter.modules if module in spec.parameters]
    if experts:
        raise ValueError(f"adapter {adapter_path!r} adapts routed experts ({experts[0]!r}...), which merge does "
                         f"not fold into per-expert checkpoint tensors; serve it with the adapter instead "
                         f"(expert LoRA is served exactly)")
    unmergeable = [f"{kind} ({where})" for kind, where in (
        ("embedding / lm_head LoRA", next((m for m in adapter.modules if m in spec.embeddings or m == spec.head), "")),
        ("DoRA", next((m for m, w in adapter.modules.items() if w.magnitude is not None), "")),
        ("a lora_B bias", next((m for m, w in adapter.modules.items() if w.bias is not None), "")),
        ("saved modules or biases", next(iter(adapter.saved), "")),
        ("trainable tokens", next(iter(adapter.token_rows), ""))) if where]
    if unmergeable:
        raise ValueError(f"adapter {adapter_path!r} holds {', '.join(unmergeable)}, which merge does not fold into "
                         f"the checkpoint; serve it with the adapter instead (served exactly as PEFT computes it)")
    merged = {}
    for name, tensor in checkpoint_weights(folder, config, scheme, skeleton.checkpoint_names()):
        if isinstance(tensor, QuantizedTensor):
            tensor = tensor.dequantize(torch.float32).to(float_dtype)
        module = name.removesuffix(".weight")
        for checkpoint_part, model_part in spec.renames:  # ChatGLM's names -> the model's, as the adapter's are
            module = module.replace(checkpoint_part, model_part)
        weights = adapter.modules.get(module)
        if weights is not None and name.endswith(".weight"):
            tensor = (tensor.float() + weights.lora_b @ weights.lora_a).to(tensor.dtype)
        merged[name] = tensor.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    for item in folder.iterdir():
        if item.is_file() and item.name not in _WEIGHT_FILES and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy2(item, out / item.name)
    if scheme is not None:  # the merged folder is a float model now
        config_path = out / "config.json"
        saved = json.loads(config_path.read_text())
        saved.pop("quantization_config", None)
        config_path.write_text(json.dumps(saved, indent=2))
        (out / "quantize_config.json").unlink(missing_ok=True)
    return out


def _float_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's config names (transformers keeps a torch.dtype or its name), else float16."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float16

