"""What a PEFT adapter_config.json says: which of the model's modules an adapter adapts, at what rank and
scale, checked for types and for options loraserve cannot serve. Matching follows PEFT 0.21
(check_target_module_exists, get_pattern_key) so an adapter adapts here exactly the modules it adapted when
PEFT trained it."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from loraserve.errors import LoRAError
from loraserve.model.lora_targets import target_shapes

CONFIG_FILE = "adapter_config.json"
BIAS_MODES = ("none", "all", "lora_only")
# Options whose computation loraserve does not implement; refused whenever set.
UNSUPPORTED_OPTIONS = {
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA input pooling",
    "kasa_config": "KaSA (which also rewrites base weights)",
    "arrow_config": "Arrow adapter routing",
}



@dataclass(frozen=True)
class LoRATargetSpec:
    """What of a loaded model an adapter may touch, by Hugging Face names."""

    # linear modules, the LM head included: "model.layers.0.self_attn.q_proj" -> (in_features, out_features)
    modules: dict[str, tuple[int, int]]
    model_name: str  # for messages ("adapter trained for X, this server runs Y")
    # fused expert tensors PEFT's target_parameters adapt: "model.layers.0.mlp.experts.gate_up_proj" ->
    # (experts, in_features, out_features)
    parameters: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    embeddings: dict[str, tuple[int, int]] = field(default_factory=dict)  # "model.embed_tokens" -> (vocab, dim)
    head: str | None = None  # the LM head's module name (a key of modules), which all-linear leaves out
    # every checkpoint tensor an adapter may replace or save (modules_to_save, bias='all'): name -> shape
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    replaceable: frozenset[str] = frozenset()  # of those, what a slot can hold an adapter's copy of
    extra_vocab_size: int = 0  # rows an adapter may add to the vocabulary (--lora-extra-vocab-size)
    context_length: int = 0  # the model's own (max_position_embeddings); 0: not checked
    long_factors: tuple[float, ...] = ()  # RoPE factors long-context adapters may use (--long-lora-scaling-factors)
    max_saved_bytes: float = float("inf")  # whole copies one adapter may bring (--max-lora-saved-mb)
    # the checkpoint's name fragments -> the model's (ChatGLM's transformer.encoder.layers. -> model.layers.),
    # rewritten in the adapter's tensor keys
    renames: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_model(cls, model: Any, model_name: str, extra_vocab_size: int = 0, long_factors: tuple[float, ...] = (),
                 max_saved_mb: float = float("inf")) -> LoRATargetSpec:
        """From a CausalLM: its adapter targets and checkpoint tensor shapes."""
        shapes = target_shapes(model)
        return cls(shapes.modules, model_name, shapes.parameters, shapes.embeddings, shapes.head, shapes.tensors,
                   shapes.replaceable, extra_vocab_size, model.spec.max_position_embeddings, tuple(long_factors),
                   max_saved_mb * 2**20, model.spec.checkpoint_renames)

    def leaf_names(self) -> str:
        """The distinct last name parts ("q_proj, v_proj, ..."), what users write in target_modules."""
        return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in [*self.modules, *self.embeddings]}))

    def linear_names(self) -> list[str]:
        """What PEFT's all-linear expands to: every linear module but the output head."""
        return [name for name in self.modules if name != self.head]


@dataclass(frozen=True)
class AdapterConfig:
    """Which modules are adapted and how strongly."""

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
    target_parameters: list[str] = field(default_factory=list)  # fused expert tensors (PEFT ParamWrapper)
    use_dora: bool = False
    lora_bias: bool = False  # lora_B has a trained bias
    bias: str = "none"  # base biases trained too: 'all' (every bias) or 'lora_only' (the adapted modules')
    modules_to_save: list[str] = field(default_factory=list)  # modules saved whole
    # embedding rows trained in place: table module (None: the input embedding) -> token ids
    trainable_token_indices: dict[str | None, list[int]] = field(default_factory=dict)
    context_length: int | None = None  # the context a long-context adapter was trained for (vLLM's key)

    def rope_factor(self, spec: LoRATargetSpec, name: str) -> float:
        """The linear RoPE factor its tokens are rotated with: ceil(context_length / the model's context)
        when it was trained beyond the model's context (vLLM's rule), which must be one the engine serves."""
        if not self.context_length or not spec.context_length or self.context_length <= spec.context_length:
            return 1.0
        factor = float(math.ceil(self.context_length / spec.context_length))
        if factor not in spec.long_factors:
            served = ", ".join(f"{f:g}" for f in spec.long_factors) or "none"
            raise LoRAError(f"adapter {name!r} was trained for a context of {self.context_length} tokens "
                            f"(context_length in {CONFIG_FILE}), {factor:g} times the model's {spec.context_length}, "
                            f"so it needs RoPE scaled by {factor:g}; this engine serves factors: {served}; restart "
                            f"with --long-lora-scaling-factors {factor:g} (and --max-model-len up to "
                            f"{int(factor * spec.context_length)})")
        return factor

    def selects_parameter(self, name: str) -> bool:
        """PEFT's rule for target_parameters: the full tensor name equals an entry or ends with it after a dot."""
        return _name_matches(self.target_parameters, name)

    def adapts(self, module: str) -> bool:
        """A linear module is adapted through target_modules, or through target_parameters naming its weight
        (PEFT's all-linear reaches a MoE router that way: gate.weight)."""
        return self.selects(module) or self.selects_parameter(f"{module}.weight")

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

    def _pattern_key(self, module: str) -> str:
        """The name PEFT matches rank/alpha patterns against: the tensor's for one adapted via target_parameters."""
        if not self.selects(module) and self.selects_parameter(f"{module}.weight"):
            return f"{module}.weight"
        return module

    def rank(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, self._pattern_key(module), self.r)

    def scaling(self, module: str) -> float:
        rank = self.rank(module)
        alpha = _pattern_value(self.alpha_pattern, self._pattern_key(module), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def parse_config(raw: dict[str, Any], spec: LoRATargetSpec, name: str) -> AdapterConfig:
    """Refuse what cannot be served, then check the types of what decides the modules and scales."""

    def bad(key: str, why: str) -> LoRAError:
        return LoRAError(f"adapter {name!r}: {CONFIG_FILE} has {key}={raw.get(key)!r}, but {why}")

    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAError(
            f"adapter {name!r} has peft_type {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be served"
        )
    for key, what in UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise LoRAError(
                f"adapter {name!r} uses {what} ({key}={raw[key]!r} in {CONFIG_FILE}), which loraserve does not "
                f"support; serve a plain LoRA adapter trained without it"
            )
    bias = raw.get("bias") or "none"
    if bias not in BIAS_MODES:
        raise bad("bias", f"PEFT's bias must be one of {', '.join(map(repr, BIAS_MODES))}")
    use_dora, lora_bias = bool(raw.get("use_dora")), bool(raw.get("lora_bias"))
    if use_dora and lora_bias:
        raise bad("lora_bias", "PEFT does not define lora_bias together with DoRA (use_dora=True); re-train with "
                  "one of them")
    modules_to_save = raw.get("modules_to_save") or []
    if not _is_str_list(modules_to_save):
        raise bad("modules_to_save", "modules_to_save must be a list of module names")
    context_length = raw.get("context_length")
    if not (context_length is None or _is_positive_int(context_length)):
        raise bad("context_length", "context_length must be a positive number of tokens")
    tokens = raw.get("trainable_token_indices") or {}
    if not (_is_int_list(tokens) or (isinstance(tokens, dict) and all(isinstance(k, str) and _is_int_list(v)
                                                                        for k, v in tokens.items()))):
        raise bad("trainable_token_indices", "trainable_token_indices must be a list of token ids or map "
                  "embedding module names to lists of token ids")

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
    parameters = raw.get("target_parameters") or []
    if not _is_str_list(parameters):
        raise bad("target_parameters", "target_parameters must be a list of parameter names")
    if targets is None and parameters:
        targets = []
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
        targets = spec.linear_names()  # PEFT saves the expanded list; a hand-written config may not
    for regex in [*(v for v in (targets, exclude) if isinstance(v, str)), *rank_pattern, *alpha_pattern]:
        try:
            re.compile(regex)
        except re.error as e:
            raise LoRAError(f"adapter {name!r}: {CONFIG_FILE} holds the invalid regex {regex!r} ({e})") from e
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)), target_modules=targets,
        exclude_modules=exclude, layers_to_transform=layers or None, layers_pattern=patterns or None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, base_model_name=base if isinstance(base, str) else None,
        target_parameters=parameters, use_dora=use_dora, lora_bias=lora_bias, bias=bias,
        modules_to_save=modules_to_save, trainable_token_indices={None: tokens} if isinstance(tokens, list) else tokens,
        context_length=context_length,
    )


def selected_modules(config: AdapterConfig, spec: LoRATargetSpec, name: str) -> list[str]:
    """The model's modules the adapter targets; every list entry must name some module of this model."""
    targetable = [*spec.modules, *spec.embeddings]
    if isinstance(config.target_modules, str):
        entries = []
        if not any(re.fullmatch(config.target_modules, module) for module in targetable):
            raise LoRAError(
                f"target_modules regex {config.target_modules!r} of adapter {name!r} matches no module of model "
                f"{spec.model_name!r}; its adaptable modules are: {spec.leaf_names()}"
            )
    else:
        entries = config.target_modules
    for entry in entries:
        if not any(module == entry or module.endswith("." + entry) for module in targetable):
            raise LoRAError(
                f"target_modules entry {entry!r} of adapter {name!r} matches no module of model {spec.model_name!r}; "
                f"its adaptable modules are: {spec.leaf_names()}"
            )
    for entry in config.target_parameters:
        tensors = [*spec.parameters, *(f"{module}.weight" for module in spec.modules)]
        if not any(_name_matches([entry], p) for p in tensors):
            have = ", ".join(sorted({p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in spec.parameters}))
            raise LoRAError(
                f"target_parameters entry {entry!r} of adapter {name!r} matches no tensor of model "
                f"{spec.model_name!r}; " + (f"its adaptable expert tensors are: {have}" if have else
                   "it has no routed experts, so only target_modules apply to it")
            )
    selected = [module for module in targetable if config.adapts(module)]
    experts = [p for p in spec.parameters if config.selects_parameter(p)]
    if experts and config.use_dora:
        raise LoRAError(f"adapter {name!r} uses DoRA on routed experts ({experts[0]!r}, target_parameters), which "
                        f"PEFT does not define; re-train with use_dora=False or without expert targets")
    selected += experts
    if not selected and not (config.modules_to_save or config.trainable_token_indices):
        raise LoRAError(
            f"adapter {name!r} selects no module of model {spec.model_name!r} (target_modules="
            f"{config.target_modules!r}, layers_to_transform={config.layers_to_transform!r}, exclude_modules="
            f"{config.exclude_modules!r}), so it would change nothing; fix its {CONFIG_FILE}"
        )
    return selected


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


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
