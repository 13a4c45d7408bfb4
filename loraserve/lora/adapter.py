"""Reading PEFT LoRA checkpoints into validated tensors, with each module's scaling folded into B, and the
content hash that identifies what was read.

Every way an adapter could be served wrongly is caught here, at load time, with a message that says
what to change: an adapter that loads is applied exactly as PEFT would apply it, and an adapter that
would silently change nothing, or change other modules than it was trained on, never loads.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraserve.errors import AdapterNotFoundError, LoRAError, ModelNotFoundError
from loraserve.lora.peft_config import (
    CONFIG_FILE,
    EMBEDDING_LEAVES,
    AdapterConfig,
    LoRATargetSpec,
    embedding_error,
    parse_config,
    selected_modules,
)
from loraserve.lora_request import LoRARequest
from loraserve.model.loader import local_snapshot

__all__ = ["AdapterNotFoundError", "LoRAAdapter", "LoRAError", "LoRAModuleWeights", "LoRATargetSpec",
           "load_adapter", "resolve_adapter_path"]

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model twice
_BASE_LAYER = ".base_layer"  # a second target_parameters wrapper nests the first: experts.base_layer.lora_A


@dataclass
class LoRAModuleWeights:
    """A module's factors; for a fused expert tensor one pair per expert, stacked on a leading dimension."""

    lora_a: torch.Tensor  # [r, in] ([experts, r, in])
    lora_b: torch.Tensor  # [out, r] ([experts, out, r]), ALREADY multiplied by the module's scaling
    rank: int


@dataclass(eq=False)
class LoRAAdapter:
    """An adapter read and validated into host memory. `content_hash` (sha256 of adapter_config.json and
    the weights file) is its identity: the same hash means the same weights, whatever name or id loaded it."""

    name: str
    int_id: int
    path: str  # resolved local folder
    modules: dict[str, LoRAModuleWeights]  # HF module name -> weights (only modules with weights)
    max_rank: int
    base_model_name: str | None  # base_model_name_or_path from adapter_config.json
    nbytes: int
    content_hash: str


def resolve_adapter_path(path_or_hub_id: str) -> Path:
    """A local folder as an absolute path, or a hub id's snapshot in the local Hugging Face cache (never
    downloads). Two spellings of one folder (relative, absolute, trailing slash) resolve to the same path."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise AdapterNotFoundError(
            f"adapter path {path_or_hub_id!r} is a file; pass the folder holding {CONFIG_FILE} and {SAFETENSORS_FILE}"
        )
    try:
        return local_snapshot(path_or_hub_id)
    except ModelNotFoundError as e:
        raise AdapterNotFoundError(
            f"adapter {path_or_hub_id!r} is neither an existing folder nor a hub id in the local Hugging Face cache "
            f"(loraserve never downloads); check the path, or fetch it with `huggingface-cli download "
            f"{path_or_hub_id}` on a connected machine"
        ) from e


def load_adapter(request: LoRARequest, spec: LoRATargetSpec, max_lora_rank: int, dtype: torch.dtype,
                 folder: Path | None = None) -> LoRAAdapter:
    """Read and check the PEFT adapter `request` names against the model's modules `spec`.

    B comes back multiplied by its module's scaling (computed in float32), both factors cast to `dtype`;
    raises LoRAError (AdapterNotFoundError for missing files) on anything that could not be served
    exactly as PEFT would apply it. `folder`: the request's path, already resolved."""
    name = request.lora_name
    folder = folder or resolve_adapter_path(request.lora_path)
    config_bytes = _read_config_bytes(folder, name)
    config = parse_config(_parse_json(config_bytes, folder / CONFIG_FILE, name), spec, name)
    selected = selected_modules(config, spec, name)
    max_rank = max(config.rank(module) for module in selected)
    if max_rank > max_lora_rank:
        raise LoRAError(
            f"LoRA rank {max_rank} of adapter {name!r} exceeds max_lora_rank={max_lora_rank}; "
            f"restart with --max-lora-rank {max_rank}"
        )
    weights_bytes, tensors = _read_weights(folder, name)
    modules = {}
    for module, (lora_a, lora_b) in _pair_tensors(tensors, name).items():
        if module.removesuffix(_BASE_LAYER) + ".gate_up_proj" in spec.parameters:  # PEFT's (nested) ParamWrapper
            module, lora_a, lora_b = _expert_factors(module.removesuffix(_BASE_LAYER), lora_a, lora_b, config, spec,
                                                     name)
            if module in modules:
                raise LoRAError(f"adapter {name!r} holds two LoRA pairs for {module!r}; re-save the adapter")
        else:
            _check_module(module, lora_a, lora_b, config, spec, name)
        scaled_b = lora_b.to(torch.float32) * config.scaling(module)
        modules[module] = LoRAModuleWeights(
            lora_a=lora_a.to(dtype).contiguous(), lora_b=scaled_b.to(dtype).contiguous(), rank=config.rank(module)
        )
    missing = [module for module in selected if module not in modules]
    if len(missing) == len(selected):
        raise LoRAError(
            f"adapter {name!r} targets {len(selected)} modules of model {spec.model_name!r} but its weights file holds "
            f"no LoRA tensors for any of them, so it would change nothing; the config and the weights do not belong "
            f"together, re-save the adapter"
        )
    if missing:
        raise LoRAError(
            f"adapter {name!r}: its weights file holds no LoRA tensors for {len(missing)} of the {len(selected)} "
            f"modules it targets (first: {missing[0]!r}); the weights file is incomplete, re-save the adapter"
        )
    digest = hashlib.sha256(config_bytes)
    digest.update(b"\0")
    digest.update(weights_bytes)
    return LoRAAdapter(
        name=name, int_id=request.lora_int_id, path=str(folder), modules=modules, max_rank=max_rank,
        base_model_name=config.base_model_name,
        nbytes=sum(w.lora_a.nbytes + w.lora_b.nbytes for w in modules.values()), content_hash=digest.hexdigest(),
    )


def _read_config_bytes(folder: Path, name: str) -> bytes:
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: its folder {folder} does not exist (any more); check the path")
    path = folder / CONFIG_FILE
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; pass the folder that PEFT's save_pretrained wrote"
        ) from None


def _parse_json(data: bytes, path: Path, name: str) -> dict[str, Any]:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"adapter {name!r}: {path} is not valid JSON ({e}); fix it or re-save the adapter") from e
    if not isinstance(raw, dict):
        raise LoRAError(f"adapter {name!r}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_weights(folder: Path, name: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The weights file's bytes (for the content hash) and its tensors, read once."""
    safetensors_path, bin_path = folder / SAFETENSORS_FILE, folder / BIN_FILE
    if safetensors_path.is_file():
        data = safetensors_path.read_bytes()
        try:
            return data, load_safetensors(data)
        except (SafetensorError, OSError) as e:
            raise LoRAError(
                f"adapter {name!r}: {safetensors_path} is corrupt or truncated ({e}); "
                f"re-download or re-save the adapter"
            ) from e
    if bin_path.is_file():
        data = bin_path.read_bytes()
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise LoRAError(
                f"adapter {name!r}: {bin_path} is corrupt or not a PyTorch state dict ({e}); re-save the adapter"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise LoRAError(f"adapter {name!r}: {bin_path} does not hold a state dict of tensors; re-save the adapter")
        return data, tensors
    raise AdapterNotFoundError(
        f"adapter {name!r}: {folder} has {CONFIG_FILE} but no weights; "
        f"expected {SAFETENSORS_FILE} (or legacy {BIN_FILE})"
    )


def _pair_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group 'base_model.model.<module>.lora_A[.<adapter>].weight' keys into (A, B) per module."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(tensors.items()):  # by name, whatever order the file lists them in
        module, factor = _split_key(key, name)
        if factor in found.setdefault(module, {}):
            raise LoRAError(f"adapter {name!r} holds two {factor} tensors for module {module!r}; re-save the adapter")
        if not tensor.is_floating_point():
            raise LoRAError(
                f"adapter {name!r}: tensor {key!r} has dtype {tensor.dtype}; quantized LoRA weights are not supported"
            )
        found[module][factor] = tensor
    pairs = {}
    for module, factors in found.items():
        if len(factors) != 2:
            (have,) = factors
            partner = "lora_B" if have == "lora_A" else "lora_A"
            raise LoRAError(
                f"adapter {name!r} has {have} but no {partner} for module {module!r}; the weights file is "
                f"incomplete, re-save the adapter"
            )
        pairs[module] = (factors["lora_A"], factors["lora_B"])
    return pairs


def _split_key(key: str, name: str) -> tuple[str, str]:
    parts = key.removeprefix(_PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):  # LoRA factors or saved weights of an embedding / the output head
        if part in EMBEDDING_LEAVES:
            raise embedding_error(name, ".".join(parts[: i + 1]))
    for i, part in enumerate(parts):
        if part in ("lora_embedding_A", "lora_embedding_B"):
            raise embedding_error(name, ".".join(parts[:i]))
        if part == "lora_magnitude_vector":
            raise LoRAError(f"adapter {name!r} holds DoRA magnitude vectors ({key!r}); DoRA adapters are not supported")
        # PEFT saves '<module>.lora_A.weight'; some tools keep the adapter name: '<module>.lora_A.default.weight'
        if part in ("lora_A", "lora_B") and i > 0 and parts[-1] == "weight" and len(parts) - i in (2, 3):
            return ".".join(parts[:i]), part
    raise LoRAError(
        f"adapter {name!r} holds tensor {key!r}, which is not a LoRA A/B weight; only plain LoRA adapters "
        f"(files with nothing but lora_A/lora_B weights) can be served"
    )


def _expert_factors(experts: str, lora_a: torch.Tensor, lora_b: torch.Tensor, config: AdapterConfig,
                    spec: LoRATargetSpec, name: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """PEFT's LoRA on a fused expert tensor [experts, out, in] (target_parameters): lora_A [experts·r, in]
    holds expert e's A in rows e·r..(e+1)·r, lora_B [out, r·experts] its B in columns e, e+experts, ... The
    tensor is told by the factors' shapes (nested wrappers name only the module). Returns the tensor's name
    and A [experts, r, in], B [experts, out, r]."""
    candidates = [p for p in spec.parameters if p.rsplit(".", 1)[0] == experts]
    for tensor in candidates:
        num_experts, in_features, out_features = spec.parameters[tensor]
        if (lora_a.ndim == lora_b.ndim == 2 and lora_a.shape[1] == in_features and lora_b.shape[0] == out_features
                and lora_a.shape[0] == lora_b.shape[1] and lora_a.shape[0] % num_experts == 0):
            break
    else:
        shapes = ", ".join(f"{p.rsplit('.', 1)[-1]} {spec.parameters[p]}" for p in candidates)
        raise LoRAError(f"adapter {name!r}: LoRA factors {tuple(lora_a.shape)} / {tuple(lora_b.shape)} for {experts!r} "
                        f"fit none of its tensors (experts, in, out): {shapes}; the adapter was likely trained for "
                        f"another base model (base_model_name_or_path={config.base_model_name!r})")
    if not config.selects_parameter(tensor):
        raise LoRAError(f"adapter {name!r} has LoRA weights for {tensor!r}, which its {CONFIG_FILE} does not target "
                        f"(target_parameters={config.target_parameters!r}); the config and the weights do not belong "
                        f"together")
    rank = lora_a.shape[0] // num_experts
    if rank != config.rank(tensor):
        raise LoRAError(f"adapter {name!r}, {tensor!r}: its factors have rank {rank} per expert, its "
                        f"{CONFIG_FILE} says r={config.rank(tensor)} (r / rank_pattern); re-save the adapter")
    return (tensor, lora_a.reshape(num_experts, rank, in_features),
            lora_b.reshape(out_features, rank, num_experts).permute(2, 0, 1))


def _check_module(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, config: AdapterConfig,
                  spec: LoRATargetSpec, name: str) -> None:
    trained_for = (
        f"the adapter was likely trained for another base model (base_model_name_or_path="
        f"{config.base_model_name!r}), this server runs {spec.model_name!r}"
    )
    if module not in spec.modules:
        raise LoRAError(
            f"adapter {name!r} has LoRA weights for module {module!r}, which model {spec.model_name!r} does not have "
            f"(its adaptable modules are: {spec.leaf_names()}); {trained_for}"
        )
    if not config.adapts(module):
        raise LoRAError(
            f"adapter {name!r} has LoRA weights for module {module!r}, which its {CONFIG_FILE} does not target "
            f"(target_modules={config.target_modules!r}, target_parameters={config.target_parameters!r}); the "
            f"config and the weights do not belong together"
        )
    in_features, out_features = spec.modules[module]
    rank = config.rank(module)
    expected_a, expected_b = (rank, in_features), (out_features, rank)
    got_a, got_b = tuple(lora_a.shape), tuple(lora_b.shape)
    if (got_a, got_b) == (expected_a, expected_b):
        return
    shapes = f"expected lora_A {expected_a} and lora_B {expected_b}, got {got_a} and {got_b}"
    if lora_a.ndim == 2 and lora_b.ndim == 2 and (got_a[1], got_b[0]) == (in_features, out_features):
        raise LoRAError(
            f"adapter {name!r}, module {module!r}: {shapes}; the rank r={rank} that {CONFIG_FILE} gives this module "
            f"(r / rank_pattern) does not match its weights, re-save the adapter"
        )
    raise LoRAError(
        f"adapter {name!r}, module {module!r}: {shapes}; {trained_for}"
    )
