"""Where adapters attach to a model, whatever its family: the slot layout of every adaptable tensor (linear
parts, fused expert tensors, the embedding table, the LM head), the vocabulary tables' whole replacements,
and the shapes an adapter's files are checked against. One mechanism for every adapter kind: the slot
manager (lora/slots.py) fills what this hands it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.lora_ops import SlotLayout, SlotTables
from loraserve.layers.norm import SlotNorm
from loraserve.model.causal_lm import HEAD_MODULE, CausalLM

HEAD_WEIGHT = f"{HEAD_MODULE}.weight"


@dataclass(frozen=True)
class LoRATargetShapes:
    """What lora.peft_config.LoRATargetSpec is made of (the model floor knows no adapter files)."""

    modules: dict[str, tuple[int, int]]  # linear modules and the LM head -> (in, out)
    parameters: dict[str, tuple[int, int, int]]  # fused expert tensors -> (experts, in, out)
    embeddings: dict[str, tuple[int, int]]  # the embedding table's module -> (vocab, dim)
    head: str
    tensors: dict[str, tuple[int, ...]]  # checkpoint tensor -> shape
    replaceable: frozenset[str]  # tensors an adapter may bring its own copy of: tables, norms, linear biases


@dataclass(frozen=True)
class SlotTarget:
    """Where one adapter module's factors go: a part of a slot layout; `bias` is the base bias of that part
    (DoRA's output map keeps it out of the scaling; a trained bias is applied as its difference to it)."""

    layout: SlotLayout
    part: str
    bias: torch.Tensor | None = None


@dataclass
class LoRASlots:
    targets: dict[str, SlotTarget]  # adapter module name -> its slot layout part
    tables: dict[str, SlotTables]  # checkpoint tensor of a vocabulary table -> its per-slot replacements
    norms: dict[str, tuple[SlotNorm, str]]  # checkpoint tensor of a norm -> (module, parameter)
    tied: bool  # the LM head reads the embedding table: trained embedding rows reach the logits too
    vocab_size: int  # the base's


def target_shapes(model: CausalLM) -> LoRATargetShapes:
    spec = model.spec
    modules = {name: (linear.in_features, linear.parts[part])
               for name, (linear, part) in model.linear_modules().items()}
    modules[HEAD_MODULE] = (spec.hidden_size, spec.vocab_size)
    parameters = {name: experts.shapes()[tensor] for name, (experts, tensor) in model.expert_tensors().items()}
    embed_module = model.embed_name.removesuffix(".weight")
    tensors = _checkpoint_shapes(model)
    tensors[HEAD_WEIGHT] = (spec.vocab_size, spec.hidden_size)
    norms = set(_norm_params(model))
    biases = {f"{name}.bias" for name, (linear, _) in model.linear_modules().items() if linear.bias is not None}
    replaceable = frozenset({model.embed_name, HEAD_WEIGHT} | norms | biases)
    return LoRATargetShapes(modules, parameters, {embed_module: (spec.vocab_size, spec.hidden_size)}, HEAD_MODULE,
                            tensors, replaceable)


def enable_lora(model: CausalLM, num_slots: int, max_rank: int, dtype: torch.dtype,
                extra_vocab_size: int) -> LoRASlots:
    """Give every adaptable tensor `num_slots` empty adapter slots (the vocabulary tables' lazily: most
    adapters never touch them) sized for adapters adding up to `extra_vocab_size` tokens."""
    spec, device = model.spec, model.device
    targets: dict[str, SlotTarget] = {}
    for name, (linear, part) in model.linear_modules().items():
        layout = linear.lora or linear.enable_lora(num_slots, max_rank, dtype)
        bias = None if linear.bias is None else linear.bias.data[linear.part_slice(part)]
        targets[name] = SlotTarget(layout, part, bias)
    for name, (experts, tensor) in model.expert_tensors().items():
        layouts = experts.lora or experts.enable_lora(num_slots, max_rank, dtype)
        targets[name] = SlotTarget(layouts[tensor], tensor)
    vocab = spec.vocab_size + extra_vocab_size
    model.embed_lora = SlotLayout.allocate({"embed": spec.hidden_size}, vocab, num_slots, max_rank, dtype, device,
                                           lazy=True)
    model.head_lora = SlotLayout.allocate({"head": vocab}, spec.hidden_size, num_slots, max_rank, dtype, device,
                                          lazy=True)
    targets[model.embed_name.removesuffix(".weight")] = SlotTarget(model.embed_lora, "embed")
    targets[HEAD_MODULE] = SlotTarget(model.head_lora, "head")
    tables = {model.embed_name: model.embed_tables, HEAD_WEIGHT: model.head_tables}
    return LoRASlots(targets, tables, _norm_params(model), spec.tie_word_embeddings, spec.vocab_size)


def _norm_params(model: CausalLM) -> dict[str, tuple[SlotNorm, str]]:
    return {f"{path}.{param}": (module, param) for path, module in model.named_modules()
            if isinstance(module, SlotNorm) for param, _ in module.named_parameters()}


def _checkpoint_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    """Shape of every checkpoint tensor (linear parts unpacked; tables kept quantized by their shape)."""
    shapes = {}
    linears = model.linear_modules()
    packed = {id(p) for linear, _ in linears.values() for p in linear.parameters()}
    for name, (linear, part) in linears.items():
        shapes[f"{name}.weight"] = (linear.parts[part], linear.in_features)
        if linear.bias is not None:
            shapes[f"{name}.bias"] = (linear.parts[part],)
    for name, param in model.named_parameters():
        if id(param) not in packed:
            shapes[name] = tuple(model.quantized[name].shape) if name in model.quantized else tuple(param.shape)
    return shapes

