"""Architecture name -> the decoder shape our one config-driven Llama-family implementation should take."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class DecoderSpec:
    """Where the supported families differ. Everything else is the Llama decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    norm_offset: bool = False  # Gemma: norms multiply by (1 + w)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    packed_checkpoint: bool = False  # Phi-3: checkpoint stores qkv_proj and gate_up_proj already packed
    sliding_window: int | None = None  # tokens each position attends to, when the model limits it

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def context_limit(self) -> int:
        """The longest context served exactly: attention here is full, which equals a sliding-window model's
        only while the whole context fits in the window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


# Without max_model_len the engine serves the model's context up to this, so a long-context model does not
# size its KV cache and per-request limits for contexts nobody asked for.
DEFAULT_MAX_MODEL_LEN = 4096


def max_model_len(spec: DecoderSpec, requested: int | None) -> int:
    """The one place the served context length is decided: `requested`, which must fit the model, or the
    model's limit capped at DEFAULT_MAX_MODEL_LEN."""
    limit = spec.context_limit
    if requested is None:
        return min(limit, DEFAULT_MAX_MODEL_LEN)
    if requested > limit:
        window = f" (its sliding window is {spec.sliding_window})" if spec.sliding_window else ""
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens{window}; "
                         f"lower max_model_len")
    return requested


def _common(config: PretrainedConfig, **overrides) -> DecoderSpec:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields = dict(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        activation=getattr(config, "hidden_act", "silu"),
    )
    fields.update(overrides)
    return DecoderSpec(**fields)


def _llama(config: PretrainedConfig) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))


def _mistral(config: PretrainedConfig) -> DecoderSpec:
    return _common(config, sliding_window=getattr(config, "sliding_window", None))


def _qwen_window(config: PretrainedConfig) -> int | None:
    """Qwen2/Qwen3 carry a sliding_window that applies only when use_sliding_window is set."""
    return config.sliding_window if getattr(config, "use_sliding_window", False) else None


def _qwen2(config: PretrainedConfig) -> DecoderSpec:
    return _common(config, qkv_bias=True, sliding_window=_qwen_window(config))


def _qwen3(config: PretrainedConfig) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=_qwen_window(config))


def _gemma(config: PretrainedConfig) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    activation = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return _common(config, qkv_bias=bias, o_bias=bias, norm_offset=True, activation=activation,
                   embed_scale=math.sqrt(config.hidden_size))


def _phi3(config: PretrainedConfig) -> DecoderSpec:
    return _common(config, packed_checkpoint=True, sliding_window=getattr(config, "sliding_window", None))


ARCHITECTURES: dict[str, Callable[[PretrainedConfig], DecoderSpec]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "GemmaForCausalLM": _gemma,
    "Phi3ForCausalLM": _phi3,
}


def decoder_spec(config: PretrainedConfig) -> DecoderSpec:
    """The spec for the config's architecture, or a ValueError naming the supported ones."""
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch](config)
    raise ValueError(
        f"unsupported architecture {', '.join(archs) or '(none given in config.json)'}; "
        f"loraserve supports: {', '.join(ARCHITECTURES)}"
    )
