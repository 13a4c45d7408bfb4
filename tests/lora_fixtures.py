"""Tiny transformers models and PEFT adapters saved to disk, shared by the LoRA tests.

PEFT itself writes the adapters and reads them back, so tests compare loraserve against PEFT's own
interpretation of the same files.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from loraserve.lora.adapter import LoRATargetSpec


def tiny_llama(name: str = "tiny-llama", seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 64, GQA 4/2 heads) unless overridden; `name` is what PEFT records
    as its base model."""
    torch.manual_seed(seed)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    config = LlamaConfig(**(sizes | config_overrides))
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = name
    return model


def tiny_gpt2(name: str = "tiny-gpt2", seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2, whose Conv1D layers store weights transposed (PEFT's fan_in_fan_out case)."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.name_or_path = name
    return model


def target_spec(model: nn.Module) -> LoRATargetSpec:
    """What an engine's spec holds, read off a transformers model: every Linear/Conv1D with (in_features,
    out_features), the output head among them; the input embedding; every tensor's shape, and as replaceable
    the vocabulary tables, norms and linear biases."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    modules, embeddings, head_name, replaceable = {}, {}, None, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            modules[name] = (module.in_features, module.out_features)
            if module.bias is not None:
                replaceable.add(f"{name}.bias")
        elif isinstance(module, Conv1D):  # weight is [in, out]
            modules[name] = tuple(module.weight.shape)
        elif module is embedding:
            embeddings[name] = tuple(module.weight.shape)
        elif "norm" in type(module).__name__.lower():
            replaceable.update(f"{name}.{param}" for param, _ in module.named_parameters())
        if module is head:
            head_name = name
    tensors = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    replaceable.update(f"{name}.weight" for name in [*embeddings, head_name])
    return LoRATargetSpec(modules=modules, model_name=model.name_or_path, embeddings=embeddings, head=head_name,
                          tensors=tensors, replaceable=frozenset(replaceable))


def make_peft_adapter(model: nn.Module, out_dir: str | Path, *, seed: int = 0, safe_serialization: bool = True,
                      noise: float = 1.0, **lora_config_kwargs) -> Path:
    """Save a PEFT LoRA adapter for `model` (left untouched) with every trained tensor random (PEFT starts B
    at zero, which would hide any mistake in B or in its scaling): A, B and lora_B's bias drawn afresh; DoRA
    magnitudes, whole saved modules, trained biases and token rows moved off their initial values, which
    are the base's own (an unchanged copy would hide a mistake in applying it), by `noise` times 20 % of their
    size; returns its folder."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_config_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" not in name and not param.requires_grad:
                continue  # the frozen base
            draw = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise * draw)
            elif "lora_" in name:
                param.copy_(draw * 0.1)
            else:
                param.add_(draw * 0.2 * noise * (param.abs().mean() or 1.0))
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return Path(out_dir)


def peft_lora_layers(model: nn.Module, adapter_dir: str | Path) -> dict[str, LoraLayer]:
    """PEFT's own reading of a saved adapter: the adapted layers of a fresh copy of `model`, keyed by
    the model's module names (lora_A/lora_B/scaling under adapter name "default")."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir))
    inner = peft_model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


def scale_lora_layers(model: nn.Module, coef: float) -> nn.Module:
    """Every PEFT LoRA layer's scaling multiplied by `coef` (what a request's lora_scale means), in place."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= coef
    return model
