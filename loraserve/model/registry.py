"""Architecture name -> the decoder shape our one config-driven Llama-family implementation should take."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

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
    packed_qkv: str | None = None  # the checkpoint's name for q/k/v stored packed: Phi-3's qkv_proj, Baichuan's W_pack
    packed_gate_up: bool = False  # Phi-3, GLM: the checkpoint stores gate_up_proj already packed
    sliding_window: int | None = None  # tokens a position attends to (itself included) on windowed layers
    # per layer "sliding_attention" / "full_attention" (Gemma 2/3, Qwen2); None: the window, if any, is everywhere
    layer_types: tuple[str, ...] | None = None
    query_scale: float | None = None  # Gemma 2/3: scores scale by query_pre_attn_scalar ** -0.5, not head_dim's
    attention_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    # Gemma 2/3, GLM-4: the attention and MLP outputs are normalised too, before the residual add; the four
    # norms' names (before attention, after it, before the MLP, after it)
    sandwich_norms: tuple[str, str, str, str] | None = None
    rope_interleaved: bool = False  # GLM: rotary over pairs (0,1), (2,3)... instead of the two halves
    rope_per_layer_type: bool = False  # Gemma 3: sliding and full layers rotate with their own rope_parameters
    moe: MoESpec | None = None  # Mixtral / Qwen-MoE: routed experts instead of the dense MLP
    family: str = "decoder"  # which module tree: "decoder" (model/decoder.py) or "gpt_bigcode"
    qkv_per_head: bool = False  # GPT-BigCode without multi_query: c_attn rows are [q, k, v] head by head
    normalized_head: bool = False  # Baichuan2's NormHead: logits use the LM head's rows L2-normalised (done at load)
    # the checkpoint's names of the o / gate_up / down linears where they are not o_proj, gate_up_proj, down_proj
    # (ChatGLM's dense, dense_h_to_4h, dense_4h_to_h): adapters' target_modules name them so
    part_names: tuple[tuple[str, str], ...] = ()
    # checkpoint name fragments -> the model's, rewritten in the checkpoint's and adapters' tensor names
    # (ChatGLM's transformer.encoder.layers. -> model.layers.)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def part_name(self, part: str) -> str:
        """The checkpoint's name of the linear part loraserve calls `part` (o_proj, gate_up_proj, down_proj)."""
        return dict(self.part_names).get(part, part)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for full attention."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


@dataclass(frozen=True)
class MoESpec:
    """Top-k routed experts: softmax over the router's logits (float32), the k best, renormalised when
    `normalize_top_k`; each expert a gated MLP of `intermediate_size`. Qwen2-MoE adds a shared expert
    (a dense gated MLP, scaled by sigmoid(shared_expert_gate(x))) to every token."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize_top_k: bool
    layers: tuple[int, ...]  # the decoder layers whose MLP is routed (Qwen-MoE may keep some dense)
    shared_expert_size: int | None = None


# Without max_model_len the engine serves the model's context up to this, so a long-context model does not
# size its KV cache and per-request limits for contexts nobody asked for.
DEFAULT_MAX_MODEL_LEN = 4096


def max_model_len(spec: DecoderSpec, requested: int | None, long_factor: float = 1.0) -> int:
    """The one place the served context length is decided: `requested`, which must fit the model (times the
    largest long-context LoRA factor, whose adapters' requests may run that long), or the model's limit
    capped at DEFAULT_MAX_MODEL_LEN. Sliding windows do not limit it: attention honours them."""
    limit = int(spec.max_position_embeddings * long_factor)
    if requested is None:
        return min(spec.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if requested > limit:
        widen = "" if long_factor > 1 else " (long-context adapters: --long-lora-scaling-factors)"
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens{widen}; "
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
        intermediate_size=getattr(config, "intermediate_size", None),
        vocab_size=config.vocab_size,
        rms_norm_eps=getattr(config, "rms_norm_eps", None),
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
    return _common(config, qkv_bias=True, sliding_window=_qwen_window(config), layer_types=_layer_types(config))


def _qwen3(config: PretrainedConfig) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _common(config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=_qwen_window(config),
                   layer_types=_layer_types(config))


def _gemma(config: PretrainedConfig) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    activation = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    return _common(config, qkv_bias=bias, o_bias=bias, norm_offset=True, activation=activation,
                   embed_scale=math.sqrt(config.hidden_size))


def _phi3(config: PretrainedConfig) -> DecoderSpec:
    return _common(config, packed_qkv="qkv_proj", packed_gate_up=True,
                   sliding_window=getattr(config, "sliding_window", None))


def _layer_types(config: PretrainedConfig) -> tuple[str, ...] | None:
    types = getattr(config, "layer_types", None)
    return tuple(types) if types else None


def _gemma2(config: PretrainedConfig) -> DecoderSpec:
    return replace(_gemma(config), sliding_window=config.sliding_window, layer_types=_layer_types(config),
                   query_scale=config.query_pre_attn_scalar ** -0.5,
                   attention_softcap=getattr(config, "attn_logit_softcapping", None),
                   final_softcap=getattr(config, "final_logit_softcapping", None),
                   sandwich_norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                   "post_feedforward_layernorm"))


def _gemma3(config: PretrainedConfig) -> DecoderSpec:
    return replace(_gemma2(config), qk_norm=True, rope_per_layer_type=True)


def _glm(config: PretrainedConfig) -> DecoderSpec:
    return _common(config, qkv_bias=bool(getattr(config, "attention_bias", True)), packed_gate_up=True,
                   rope_interleaved=True)


def _glm4(config: PretrainedConfig) -> DecoderSpec:
    return replace(_glm(config), sandwich_norms=("input_layernorm", "post_self_attn_layernorm",
                                                 "post_attention_layernorm", "post_mlp_layernorm"))


def _mixtral(config: PretrainedConfig) -> DecoderSpec:
    moe = MoESpec(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                  intermediate_size=config.intermediate_size, normalize_top_k=True,
                  layers=tuple(range(config.num_hidden_layers)))
    return replace(_mistral(config), moe=moe)


def _qwen_moe(config: PretrainedConfig, base: DecoderSpec, shared: int | None) -> DecoderSpec:
    step, dense = config.decoder_sparse_step, set(getattr(config, "mlp_only_layers", None) or ())
    layers = tuple(i for i in range(config.num_hidden_layers)
                   if i not in dense and config.num_experts > 0 and (i + 1) % step == 0)
    moe = MoESpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                  intermediate_size=config.moe_intermediate_size, normalize_top_k=bool(config.norm_topk_prob),
                  layers=layers, shared_expert_size=shared)
    return replace(base, moe=moe)


def _qwen2_moe(config: PretrainedConfig) -> DecoderSpec:
    return _qwen_moe(config, _qwen2(config), config.shared_expert_intermediate_size or None)


def _qwen3_moe(config: PretrainedConfig) -> DecoderSpec:
    return _qwen_moe(config, _qwen3(config), None)


def _baichuan(config: PretrainedConfig) -> DecoderSpec:
    """Baichuan / Baichuan2 7B: Llama with q/k/v packed as W_pack; the LlamaConfig comes from
    model/native_configs.py, which says whether the head is Baichuan2's NormHead."""
    return replace(_llama(config), packed_qkv="W_pack", normalized_head=bool(getattr(config, "normalized_head", False)))


# ChatGLM2/3, GLM-4's checkpoint names -> the GLM decoder's (transformers' glm/convert_glm_weights_to_hf.py)
_CHATGLM_RENAMES = (
    ("transformer.embedding.word_embeddings.", "model.embed_tokens."),
    ("transformer.encoder.final_layernorm.", "model.norm."),
    ("transformer.encoder.layers.", "model.layers."),
    (".self_attention.", ".self_attn."),
    ("transformer.output_layer.", "lm_head."),
    ("transformer.rotary_pos_emb.", "model.rotary_emb."),  # its inv_freq buffer, skipped at load
)


def _chatglm(config: PretrainedConfig) -> DecoderSpec:
    """ChatGLM2 / ChatGLM3 / GLM-4 in their original layout: GLM with ChatGLM's module names; the GlmConfig comes
    from model/native_configs.py."""
    return replace(_glm(config), packed_qkv="query_key_value", checkpoint_renames=_CHATGLM_RENAMES,
                   part_names=(("o_proj", "dense"), ("gate_up_proj", "dense_h_to_4h"), ("down_proj", "dense_4h_to_h")))


def _gpt_bigcode(config: PretrainedConfig) -> DecoderSpec:
    heads = config.num_attention_heads
    return _common(config, family="gpt_bigcode", num_kv_heads=1 if config.multi_query else heads,
                   head_dim=config.hidden_size // heads, intermediate_size=config.n_inner or 4 * config.hidden_size,
                   rms_norm_eps=config.layer_norm_epsilon, activation=config.activation_function,
                   query_scale=None if config.scale_attn_weights else 1.0, qkv_per_head=not config.multi_query,
                   qkv_bias=True, o_bias=True, mlp_bias=True)


ARCHITECTURES: dict[str, Callable[[PretrainedConfig], DecoderSpec]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "GemmaForCausalLM": _gemma,
    "Phi3ForCausalLM": _phi3,
    "Gemma2ForCausalLM": _gemma2,
    "Gemma3ForCausalLM": _gemma3,
    "GlmForCausalLM": _glm,
    "Glm4ForCausalLM": _glm4,
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": _qwen2_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "GPTBigCodeForCausalLM": _gpt_bigcode,
    "BaichuanForCausalLM": _baichuan,  # Baichuan2 7B (and the 13B ALiBi models, refused by native_configs)
    "BaiChuanForCausalLM": _baichuan,  # Baichuan 7B (its checkpoint code spells the class with a capital C)
    "ChatGLMModel": _chatglm,  # ChatGLM2 / ChatGLM3 / GLM-4 (the first ChatGLM-6B refused by native_configs)
    "ChatGLMForConditionalGeneration": _chatglm,
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
