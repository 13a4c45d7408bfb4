"""Reading PEFT LoRA-family checkpoints into validated tensors, with each module's scaling folded into B, and
the content hash that identifies what was read.

Every kind PEFT's LoRA writes is read: factors of linear modules, of the LM head and of embeddings
(lora_embedding_A/B), of fused expert tensors (target_parameters); DoRA magnitudes, turned into the per-row
factor m / ‖W₀ + scale·BA‖ once here from the base weights; lora_B biases; trained base biases (bias='all' /
'lora_only'), modules_to_save and the embedding copies save_embedding_layers writes, kept whole; the rows of
trainable_token_indices. Every way an adapter could be served wrongly is caught here, at load time, with a
message that says what to change: an adapter that loads is applied exactly as PEFT would apply it, and an
adapter that would silently change nothing, or change other modules than it was trained on, never loads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.config import LoRAConfig
from loraserve.errors import AdapterNotFoundError, LoRAError
from loraserve.layers.lora_ops import DoRANorms
from loraserve.lora.adapter_files import (
    SAFETENSORS_FILE,
    AdapterFiles,
    parse_json,
    parse_weights,
    read_adapter_files,
    resolve_adapter_path,
)
from loraserve.lora.peft_config import CONFIG_FILE, AdapterConfig, LoRATargetSpec, parse_config, selected_modules
from loraserve.lora.peft_tensors import ModuleTensors, classify
from loraserve.lora.whole_copies import (
    BaseWeights,
    TokenRows,
    adapter_tokenizer,
    check_vocabulary,
    trained_token_rows,
    vocabulary_rows,
    whole_copies,
)
from loraserve.lora_request import LoRARequest

__all__ = ["SAFETENSORS_FILE", "AdapterNotFoundError", "BaseWeights", "LoRAAdapter", "LoRAError",
           "LoRAModuleWeights", "LoRATargetSpec", "TokenRows", "load_adapter", "resolve_adapter_path"]

_BASE_LAYER = ".base_layer"  # a second target_parameters wrapper nests the first: experts.base_layer.lora_A


@dataclass
class LoRAModuleWeights:
    """A module's factors; for a fused expert tensor one pair per expert, stacked on a leading dimension; for
    an embedding A is [r, vocab] (PEFT's lora_embedding_A), read by token id."""

    lora_a: torch.Tensor  # [r, in] ([experts, r, in])
    lora_b: torch.Tensor  # [out, r] ([experts, out, r]), ALREADY multiplied by the module's scaling
    rank: int
    magnitude: torch.Tensor | None = None  # [out] float32, DoRA's m as saved (set for every DoRA module)
    dora_norms: DoRANorms | None = None  # ‖W₀ + c·scaling·BA‖ per output row, with the base at hand
    bias: torch.Tensor | None = None  # [out] float32 added to the output: scaling · lora_B.bias


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
    # checkpoint tensor name -> the adapter's whole copy (modules_to_save, trained biases, resized tables),
    # only those that differ from the base's
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)  # embedding weight name -> trained rows
    added_tokens: int = 0  # vocabulary rows past the base's that its tables bring
    # the tokenizer saved beside the adapter (its added tokens, its chat template), None: the base model's
    tokenizer: Any = None
    rope_factor: float = 1.0  # linear RoPE factor of a long-context adapter's tokens
    config: AdapterConfig | None = None  # what adapter_config.json said (for its load report)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence ids its own tokenizer adds to the model's (a chat fine-tune's new end token)."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return frozenset() if eos is None else frozenset([eos])


def load_adapter(request: LoRARequest, spec: LoRATargetSpec, max_lora_rank: int, dtype: torch.dtype,
                 folder: Path | None = None, base: BaseWeights | None = None,
                 files: AdapterFiles | None = None, max_file_mb: int = LoRAConfig.max_lora_file_mb) -> LoRAAdapter:
    """Read and check the PEFT adapter `request` names against the model's modules `spec`.

    B comes back multiplied by its module's scaling (computed in float32), every tensor cast to `dtype`;
    raises LoRAError (AdapterNotFoundError for missing files) on anything that could not be served
    exactly as PEFT would apply it. `folder`: the request's path, already resolved; `base`: the base model's
    weights, which serving needs (DoRA's norms; dropping saved copies equal to the base); without it the
    adapter is read for inspection or merging only; `files`: the folder's bytes, already read; else its files
    are read, each at most `max_file_mb` MiB."""
    name = request.lora_name
    folder = folder or resolve_adapter_path(request.lora_path)
    files = files or read_adapter_files(folder, name, max_file_mb)
    config_bytes = files.config
    config = parse_config(parse_json(config_bytes, folder / CONFIG_FILE, name), spec, name)
    selected = selected_modules(config, spec, name)
    rope_factor = config.rope_factor(spec, name)
    max_rank = max((config.rank(module) for module in selected), default=0)
    if max_rank > max_lora_rank:
        raise LoRAError(
            f"LoRA rank {max_rank} of adapter {name!r} exceeds max_lora_rank={max_lora_rank}; "
            f"restart with --max-lora-rank {max_rank}"
        )
    found = classify(parse_weights(files, name), name, spec.renames)
    modules: dict[str, LoRAModuleWeights] = {}
    token_rows: dict[str, TokenRows] = {}
    for module, held in found.modules.items():
        if held.token_rows is not None:
            table, rows = trained_token_rows(module, held.token_rows, config, spec, name)
            token_rows[table] = rows
            continue
        module, weights = _module_weights(module, held, config, spec, name, base)
        if module in modules:
            raise LoRAError(f"adapter {name!r} holds two LoRA pairs for {module!r}; re-save the adapter")
        modules[module] = weights
    missing = [module for module in selected if module not in modules]
    if missing and len(missing) == len(selected):
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
    saved, token_rows = whole_copies(found.whole, token_rows, config, spec, selected, name, base, dtype)
    for weights in modules.values():
        weights.lora_a = weights.lora_a.to(dtype).contiguous()
        weights.lora_b = weights.lora_b.to(dtype).contiguous()
    vocab, rows = spec.modules[spec.head][1] if spec.head else 0, vocabulary_rows(spec, modules, saved, token_rows)
    digest = hashlib.sha256(config_bytes)
    digest.update(b"\0")
    digest.update(files.weights)
    nbytes = sum(w.lora_a.nbytes + w.lora_b.nbytes for w in modules.values())
    nbytes += sum(t.nbytes for t in saved.values()) + sum(r.rows.nbytes for r in token_rows.values())
    return LoRAAdapter(
        name=name, int_id=request.lora_int_id, path=str(folder), modules=modules, max_rank=max_rank,
        base_model_name=config.base_model_name, nbytes=nbytes, content_hash=digest.hexdigest(), saved=saved,
        token_rows=token_rows, added_tokens=max(rows - vocab, 0), tokenizer=adapter_tokenizer(folder, name, rows),
        rope_factor=rope_factor, config=config,
    )


def _module_weights(module: str, held: ModuleTensors, config: AdapterConfig, spec: LoRATargetSpec, name: str,
                    base: BaseWeights | None) -> tuple[str, LoRAModuleWeights]:
    """One module's validated factors, scaled B, DoRA factor and bias."""
    if held.lora_a is None or held.lora_b is None:
        have, partner = ("lora_A", "lora_B") if held.lora_a is not None else ("lora_B", "lora_A")
        if held.lora_a is None and held.lora_b is None:
            have = "lora_magnitude_vector" if held.magnitude is not None else "a lora_B bias"
        raise LoRAError(f"adapter {name!r} has {have} but no {partner} for module {module!r}; the weights file is "
                        f"incomplete, re-save the adapter")
    lora_a, lora_b = held.lora_a, held.lora_b
    if held.embedding:  # PEFT's lora_embedding_B is [dim, r] like a linear's B; A [r, vocab] is read by column
        _check_module(module, lora_a, lora_b, config, spec, name, embedding=True)
    elif module.removesuffix(_BASE_LAYER) + ".gate_up_proj" in spec.parameters:  # PEFT's (nested) ParamWrapper
        module, lora_a, lora_b = _expert_factors(module.removesuffix(_BASE_LAYER), lora_a, lora_b, config, spec, name)
    else:
        _check_module(module, lora_a, lora_b, config, spec, name)
    scaling = config.scaling(module)
    weights = LoRAModuleWeights(lora_a=lora_a.float(), lora_b=lora_b.float() * scaling, rank=config.rank(module))
    if held.lora_b_bias is not None:
        if not config.lora_bias or held.lora_b_bias.shape != (lora_b.shape[0],):
            raise LoRAError(f"adapter {name!r}: module {module!r} has a lora_B bias of shape "
                            f"{tuple(held.lora_b_bias.shape)} but its {CONFIG_FILE} says lora_bias="
                            f"{config.lora_bias}; the config and the weights do not belong together")
        weights.bias = held.lora_b_bias.float() * scaling
    if config.use_dora != (held.magnitude is not None):
        why = "no DoRA magnitude" if config.use_dora else "a DoRA magnitude but use_dora is false"
        raise LoRAError(f"adapter {name!r}: module {module!r} has {why} ({CONFIG_FILE} use_dora={config.use_dora}); "
                        f"the config and the weights do not belong together, re-save the adapter")
    if held.magnitude is not None:
        if held.magnitude.shape != (lora_b.shape[0],):
            raise LoRAError(f"adapter {name!r}: module {module!r} has a DoRA magnitude of shape "
                            f"{tuple(held.magnitude.shape)}, expected ({lora_b.shape[0]},); re-save the adapter")
        weights.magnitude = held.magnitude.float()
        if base is not None:  # without the base (inspecting an adapter) the norms are not taken
            # DoRA's scale m / ‖W₀ + c·BA‖ per output row; PEFT treats the norm as a constant, and so does this
            weights.dora_norms = base.dora_norms(module, weights.lora_a, weights.lora_b)
    return module, weights


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
                  spec: LoRATargetSpec, name: str, embedding: bool = False) -> None:
    trained_for = (
        f"the adapter was likely trained for another base model (base_model_name_or_path="
        f"{config.base_model_name!r}), this server runs {spec.model_name!r}"
    )
    shapes_of = spec.embeddings if embedding else spec.modules
    if module not in shapes_of:
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
    in_features, out_features = shapes_of[module]
    if embedding and lora_a.ndim == 2 and in_features < lora_a.shape[1]:  # trained on a resized vocabulary
        check_vocabulary(lora_a.shape[1], in_features, spec, name, f"lora_embedding_A of {module!r}")
        in_features = lora_a.shape[1]
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
