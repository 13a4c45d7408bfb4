"""What an adapter is, as loaded: its kinds, ranks and scalings per module, what it targets layer by layer,
what it brings whole, its memory and identity. The same report offline (`LLM.lora_report`), over HTTP (the
load response, /v1/models) and from `loraserve inspect`, a user's first check of an adapter from elsewhere."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from loraserve.config import LoRAConfig
from loraserve.lora.adapter import LoRAAdapter, load_adapter
from loraserve.lora.peft_config import LoRATargetSpec
from loraserve.lora_request import LoRARequest
from loraserve.model.builder import load_hf_config, model_skeleton
from loraserve.model.loader import resolve_model

_LAYER = re.compile(r"\.(\d+)\.")


def adapter_report(adapter: LoRAAdapter, spec: LoRATargetSpec) -> dict[str, Any]:
    """A JSON-ready description of a loaded adapter (see the module docstring)."""
    config = adapter.config
    by_layer: dict[str, set[str]] = defaultdict(set)
    ranks: dict[str, set[int]] = defaultdict(set)
    scalings: dict[str, set[float]] = defaultdict(set)
    for module, weights in adapter.modules.items():
        match = _LAYER.search(module)
        leaf = module[match.end():] if match else module
        by_layer[match.group(1) if match else "outside layers"].add(leaf)
        ranks[leaf].add(weights.rank)
        scalings[leaf].add(round(config.scaling(module), 6) if config is not None else None)
    # what the adapter writes into a slot: its factors, DoRA / bias output maps, whole copies (the rank-factor
    # tables themselves are allocated for max_lora_rank whatever the adapter)
    vectors = [t for w in adapter.modules.values() for t in (w.magnitude, w.bias) if t is not None]
    slot_bytes = adapter.nbytes + sum(t.numel() for t in vectors) * next(
        (w.lora_a.element_size() for w in adapter.modules.values()), 0)
    return {
        "name": adapter.name,
        "lora_int_id": adapter.int_id,
        "path": adapter.path,
        "content_hash": adapter.content_hash,
        "base_model_name_or_path": adapter.base_model_name,
        "kinds": _kinds(adapter, spec),
        "r": None if config is None else config.r,
        "lora_alpha": None if config is None else config.lora_alpha,
        "use_rslora": None if config is None else config.use_rslora,
        "rank_pattern": {} if config is None else config.rank_pattern,
        "alpha_pattern": {} if config is None else config.alpha_pattern,
        "max_rank": adapter.max_rank,
        "rank_by_module": {leaf: sorted(r) for leaf, r in sorted(ranks.items())},
        "scaling_by_module": {leaf: sorted(s) for leaf, s in sorted(scalings.items())},
        "adapted_modules": len(adapter.modules),
        "targets_by_layer": _layer_ranges(by_layer),
        "modules_to_save": [] if config is None else config.modules_to_save,
        "saved_tensors": sorted(adapter.saved),
        "trainable_token_rows": {table: rows.ids.tolist() for table, rows in adapter.token_rows.items()},
        "added_tokens": adapter.added_tokens,
        "own_tokenizer": adapter.tokenizer is not None,
        "long_context_factor": adapter.rope_factor,
        "context_length": None if config is None else config.context_length,
        "host_bytes": adapter.nbytes,
        "slot_bytes": slot_bytes,
    }


def _layer_ranges(by_layer: dict[str, set[str]]) -> dict[str, list[str]]:
    """Layers adapting the same modules folded into ranges: {"0-13": [...], "14": [...], "outside layers": [...]}."""
    numbered = sorted((int(layer), sorted(leaves)) for layer, leaves in by_layer.items() if layer.isdigit())
    ranges: dict[str, list[str]] = {}
    start = None
    for i, (layer, leaves) in enumerate(numbered):
        start = layer if start is None else start
        following = numbered[i + 1] if i + 1 < len(numbered) else None
        if following is None or following[0] != layer + 1 or following[1] != leaves:
            ranges[str(layer) if start == layer else f"{start}-{layer}"] = leaves
            start = None
    if "outside layers" in by_layer:
        ranges["outside layers"] = sorted(by_layer["outside layers"])
    return ranges


def inspect_adapter(adapter_path: str, model: str | None = None, config: LoRAConfig | None = None) -> dict[str, Any]:
    """The load report of an adapter against `model`'s architecture, read as an engine with `config`'s limits
    would read it (LoRAError, naming the flag to change, where it would refuse it), without loading any base
    weight: the model's modules come from its config alone. DoRA norms need the weights, so they are left
    to serving."""
    config = config or LoRAConfig()
    folder = resolve_model(model)
    hf_config = load_hf_config(folder)
    with torch.device("meta"):  # the architecture alone: its modules and tensor shapes, no memory
        skeleton = model_skeleton(hf_config, max_positions=1)
    spec = LoRATargetSpec.of_model(skeleton, str(model or folder), config.lora_extra_vocab_size,
                                   config.long_lora_scaling_factors, config.max_lora_saved_mb)
    name = Path(adapter_path).name or adapter_path
    adapter = load_adapter(LoRARequest(name, 1, adapter_path), spec, config.max_lora_rank, torch.float32,
                           max_file_mb=config.max_lora_file_mb)
    return adapter_report(adapter, spec)


def _kinds(adapter: LoRAAdapter, spec: LoRATargetSpec) -> list[str]:
    modules = adapter.modules
    kinds = []
    if any(m in spec.modules and m != spec.head for m in modules):
        kinds.append("lora")
    if any(m in spec.parameters for m in modules):
        kinds.append("expert lora (target_parameters)")
    if any(m in spec.embeddings for m in modules):
        kinds.append("embedding lora")
    if spec.head in modules:
        kinds.append("lm_head lora")
    if any(w.magnitude is not None for w in modules.values()):
        kinds.append("dora")
    if any(w.bias is not None for w in modules.values()):
        kinds.append("lora_bias")
    if any(key.endswith(".bias") for key in adapter.saved):
        kinds.append("trained biases")
    if any(not key.endswith(".bias") for key in adapter.saved):
        kinds.append("modules_to_save")
    if adapter.token_rows:
        kinds.append("trainable tokens")
    if adapter.added_tokens:
        kinds.append("added tokens")
    if adapter.rope_factor != 1:
        kinds.append("long context")
    return kinds
