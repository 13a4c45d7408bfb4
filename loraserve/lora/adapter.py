"""Reading PEFT LoRA checkpoints into validated tensors, with each module's scaling folded into B.

Every way an adapter could be served wrongly is caught here, at load time, with a message that says
what to change: an adapter that loads is applied exactly as PEFT would apply it, and an adapter that
would silently change nothing, or change other modules than it was trained on, never loads.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraserve.lora.request import LoRARequest
from loraserve.model.loader import ModelNotFoundError, local_snapshot

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model twice
_EMBEDDING_LEAVES = ("embed_tokens", "lm_head")
# Options that make an adapter compute more than x @ A.T @ B.T * scaling; refused whenever set.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA input pooling",
    "kasa_config": "KaSA (which also rewrites base weights)",
    "arrow_config": "Arrow adapter routing",
}


class LoRAError(ValueError):
    """Base: adapter problems a user can fix. Server maps to HTTP 400."""


class AdapterNotFoundError(LoRAError):
    """Folder/hub id/files missing. Server maps to HTTP 404 or 400."""


@dataclass(frozen=True)
class LoRATargetSpec:
    """The adaptable linear modules of a loaded model, by their Hugging Face module names."""

    modules: dict[str, tuple[int, int]]  # "model.layers.0.self_attn.q_proj" -> (in_features, out_features)
    model_name: str  # for messages ("adapter trained for X, this server runs Y")

    def leaf_names(self) -> str:
        """The distinct last name parts ("q_proj, v_proj, ..."), what users write in target_modules."""
        return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in self.modules}))


@dataclass
class LoRAModuleWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], ALREADY multiplied by the module's scaling
    rank: int


@dataclass
class LoRAAdapter:
    name: str
    int_id: int
    path: str  # resolved local folder
    modules: dict[str, LoRAModuleWeights]  # HF module name -> weights (only modules with weights)
    max_rank: int
    base_model_name: str | None  # base_model_name_or_path from adapter_config.json
    nbytes: int


@dataclass(frozen=True)
class _AdapterConfig:
    """What adapter_config.json says about which modules are adapted and how strongly, checked for types.

    Matching follows PEFT 0.21 (check_target_module_exists, get_pattern_key) so an adapter adapts here
    exactly the modules it adapted when PEFT trained it.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str  # a list of names or suffixes, or one regex over full names
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | None  # None: every layer
    layers_pattern: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name: str | None

    def selects(self, module: str) -> bool:
        if self.exclude_modules is not None and _name_matches(self.exclude_modules, module):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:  # a full name is taken as is, whatever layers_to_transform says
            return True
        if not _name_matches(self.target_modules, module):
            return False
        if self.layers_to_transform is None:
            return True
        layer = _layer_index(module, self.layers_pattern)
        return layer is not None and layer in self.layers_to_transform

    def rank(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.r)

    def scaling(self, module: str) -> float:
        rank = self.rank(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def resolve_adapter_path(path_or_hub_id: str) -> Path:
    """A local folder as is, or a hub id's snapshot in the local Hugging Face cache (never downloads)."""
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


def load_adapter(request: LoRARequest, spec: LoRATargetSpec, max_lora_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read and check the PEFT adapter `request` names against the model's modules `spec`.

    B comes back multiplied by its module's scaling (computed in float32), both factors cast to `dtype`;
    raises LoRAError (AdapterNotFoundError for missing files) on anything that could not be served
    exactly as PEFT would apply it.
    """
    name = request.lora_name
    folder = resolve_adapter_path(request.lora_path)
    config = _parse_config(_read_config(folder, name), spec, name)
    selected = _selected_modules(config, spec, name)
    max_rank = max(config.rank(module) for module in selected)
    if max_rank > max_lora_rank:
        raise LoRAError(
            f"LoRA rank {max_rank} of adapter {name!r} exceeds max_lora_rank={max_lora_rank}; "
            f"restart with --max-lora-rank {max_rank}"
        )
    pairs = _pair_tensors(_read_weights(folder, name), name)
    modules = {}
    for module, (lora_a, lora_b) in pairs.items():
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
    nbytes = sum(w.lora_a.nbytes + w.lora_b.nbytes for w in modules.values())
    return LoRAAdapter(
        name=name, int_id=request.lora_int_id, path=str(folder), modules=modules, max_rank=max_rank,
        base_model_name=config.base_model_name, nbytes=nbytes,
    )


def _read_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; pass the folder that PEFT's save_pretrained wrote"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"adapter {name!r}: {path} is not valid JSON ({e}); fix it or re-save the adapter") from e
    if not isinstance(raw, dict):
        raise LoRAError(f"adapter {name!r}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse_config(raw: dict[str, Any], spec: LoRATargetSpec, name: str) -> _AdapterConfig:
    """Refuse what cannot be served, then check the types of what decides the modules and scales."""

    def bad(key: str, why: str) -> LoRAError:
        return LoRAError(f"adapter {name!r}: {CONFIG_FILE} has {key}={raw.get(key)!r}, but {why}")

    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAError(
            f"adapter {name!r} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be served"
        )
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise LoRAError(
                f"adapter {name!r} uses {what} ({key}={raw[key]!r} in {CONFIG_FILE}), which loraserve does not "
                f"support; serve a plain LoRA adapter trained without it"
            )
    if raw.get("modules_to_save"):
        raise bad("modules_to_save", "fully trained copies of modules (modules_to_save) are not supported; "
                  "retrain without modules_to_save, or merge the adapter into the base model")
    if raw.get("bias", "none") != "none":
        raise bad("bias", "adapters that train base-layer biases are not supported; only bias='none' is")

    r = raw.get("r")
    if not _is_positive_int(r):
        raise bad("r", "the LoRA rank r must be a positive integer")
    alpha = raw.get("lora_alpha", 8)  # PEFT's LoraConfig default
    if not _is_number(alpha):
        raise bad("lora_alpha", "lora_alpha must be a number")
    rank_pattern = raw.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_is_positive_int(v) for v in rank_pattern.values()):
        raise bad("rank_pattern", "rank_pattern must map module patterns to positive integer ranks")
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(_is_number(v) for v in alpha_pattern.values()):
        raise bad("alpha_pattern", "alpha_pattern must map module patterns to numbers")

    targets = raw.get("target_modules")
    if not (isinstance(targets, str) or _is_str_list(targets)):
        raise bad("target_modules", "target_modules must be a list of module names or a regex string")
    exclude = raw.get("exclude_modules")
    if not (exclude is None or isinstance(exclude, str) or _is_str_list(exclude)):
        raise bad("exclude_modules", "exclude_modules must be a list of module names or a regex string")
    layers = raw.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not (layers is None or (isinstance(layers, list) and all(_is_int(i) for i in layers))):
        raise bad("layers_to_transform", "layers_to_transform must be a layer index or a list of them")
    patterns = raw.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not (patterns is None or _is_str_list(patterns)):
        raise bad("layers_pattern", "layers_pattern must be a name or a list of names")
    if isinstance(targets, str) and (layers is not None or patterns is not None):
        raise bad("target_modules", "layers_to_transform and layers_pattern only apply to a list of target_modules")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(spec.modules)  # PEFT saves the expanded list; a hand-written config may not
    for regex in [*(v for v in (targets, exclude) if isinstance(v, str)), *rank_pattern, *alpha_pattern]:
        try:
            re.compile(regex)
        except re.error as e:
            raise LoRAError(f"adapter {name!r}: {CONFIG_FILE} holds the invalid regex {regex!r} ({e})") from e
    base = raw.get("base_model_name_or_path")
    return _AdapterConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)), target_modules=targets,
        exclude_modules=exclude, layers_to_transform=layers or None, layers_pattern=patterns or None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, base_model_name=base if isinstance(base, str) else None,
    )


def _selected_modules(config: _AdapterConfig, spec: LoRATargetSpec, name: str) -> list[str]:
    """The model's modules the adapter targets; every list entry must name some module of this model."""
    if isinstance(config.target_modules, str):
        entries = []
        if not any(re.fullmatch(config.target_modules, module) for module in spec.modules):
            raise LoRAError(
                f"target_modules regex {config.target_modules!r} of adapter {name!r} matches no module of model "
                f"{spec.model_name!r}; its adaptable modules are: {spec.leaf_names()}"
            )
    else:
        entries = config.target_modules
    for entry in entries:
        if entry.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES:
            raise _embedding_error(name, entry)
        if not any(module == entry or module.endswith("." + entry) for module in spec.modules):
            raise LoRAError(
                f"target_modules entry {entry!r} of adapter {name!r} matches no module of model {spec.model_name!r}; "
                f"its adaptable modules are: {spec.leaf_names()}"
            )
    selected = [module for module in spec.modules if config.selects(module)]
    if not selected:
        raise LoRAError(
            f"adapter {name!r} selects no module of model {spec.model_name!r} (target_modules="
            f"{config.target_modules!r}, layers_to_transform={config.layers_to_transform!r}, exclude_modules="
            f"{config.exclude_modules!r}), so it would change nothing; fix its {CONFIG_FILE}"
        )
    return selected


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = folder / SAFETENSORS_FILE, folder / BIN_FILE
    if safetensors_path.is_file():
        try:
            return load_file(safetensors_path)
        except (SafetensorError, OSError) as e:
            raise LoRAError(
                f"adapter {name!r}: {safetensors_path} is corrupt or truncated ({e}); "
                f"re-download or re-save the adapter"
            ) from e
    if bin_path.is_file():
        try:
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise LoRAError(
                f"adapter {name!r}: {bin_path} is corrupt or not a PyTorch state dict ({e}); re-save the adapter"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise LoRAError(f"adapter {name!r}: {bin_path} does not hold a state dict of tensors; re-save the adapter")
        return tensors
    raise AdapterNotFoundError(
        f"adapter {name!r}: {folder} has {CONFIG_FILE} but no weights; "
        f"expected {SAFETENSORS_FILE} (or legacy {BIN_FILE})"
    )


def _pair_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group 'base_model.model.<module>.lora_A[.<adapter>].weight' keys into (A, B) per module."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
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
        if part in _EMBEDDING_LEAVES:
            raise _embedding_error(name, ".".join(parts[: i + 1]))
    for i, part in enumerate(parts):
        if part in ("lora_embedding_A", "lora_embedding_B"):
            raise _embedding_error(name, ".".join(parts[:i]))
        if part == "lora_magnitude_vector":
            raise LoRAError(f"adapter {name!r} holds DoRA magnitude vectors ({key!r}); DoRA adapters are not supported")
        # PEFT saves '<module>.lora_A.weight'; some tools keep the adapter name: '<module>.lora_A.default.weight'
        if part in ("lora_A", "lora_B") and i > 0 and parts[-1] == "weight" and len(parts) - i in (2, 3):
            return ".".join(parts[:i]), part
    raise LoRAError(
        f"adapter {name!r} holds tensor {key!r}, which is not a LoRA A/B weight; only plain LoRA adapters "
        f"(files with nothing but lora_A/lora_B weights) can be served"
    )


def _check_module(module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, config: _AdapterConfig,
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
    if not config.selects(module):
        raise LoRAError(
            f"adapter {name!r} has LoRA weights for module {module!r}, which its {CONFIG_FILE} does not target "
            f"(target_modules={config.target_modules!r}); the config and the weights do not belong together"
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


def _embedding_error(name: str, module: str) -> LoRAError:
    return LoRAError(
        f"adapter {name!r} targets {module!r}: LoRA on embeddings or lm_head is not supported; "
        f"retrain without embed_tokens/lm_head in target_modules"
    )


def _name_matches(names: list[str] | str, module: str) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry equals it or ends it after a dot."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith("." + n) for n in names)


def _layer_index(module: str, layers_pattern: list[str] | None) -> int | None:
    """The first numbered name part (after a layers_pattern name if given): 'model.layers.3.mlp' -> 3."""
    patterns = [r".*?\.[^.]*"] if layers_pattern is None else [rf"(?:^|.*?\.){p}" for p in layers_pattern]
    for pattern in patterns:
        match = re.match(rf"{pattern}\.(?P<idx>\d+)\.", module)
        if match:
            return int(match["idx"])
    return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern lookup: the first key (a regex) matching the end of the full name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
