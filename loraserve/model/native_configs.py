"""Configs of models that ship their modelling code with the checkpoint (config.json's auto_map) but are, layer
for layer, a family loraserve already serves: read from config.json's keys alone, no checkpoint code imported
or run, into the transformers config of that family.

Baichuan / Baichuan2 7B are the Llama decoder with q/k/v packed as `W_pack` (registry._baichuan); Baichuan2's
LM head is a NormHead (its rows L2-normalised), folded into the weight at load (CausalLM.load_weights).

ChatGLM2 / ChatGLM3 / GLM-4 (model_type chatglm) are the GLM decoder (registry._chatglm): RoPE on the first half of
each head in interleaved pairs, q/k/v packed as `query_key_value`, [gate; up] packed as `dense_h_to_4h`; their
checkpoint names are rewritten to the model's at load (DecoderSpec.checkpoint_renames), as transformers'
glm/convert_glm_weights_to_hf.py maps them."""
from __future__ import annotations

from transformers import GlmConfig, LlamaConfig, PretrainedConfig

BAICHUAN_ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")
CHATGLM_ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
_BAICHUAN2_VOCAB_SIZE = 125696
_BAICHUAN_13B_SHAPE = (5120, 40)  # hidden_size, num_hidden_layers of Baichuan-13B and Baichuan2-13B


def native_config(raw: dict) -> PretrainedConfig | None:
    """The config of a checkpoint-code model served natively (Baichuan 7B, ChatGLM2/3, GLM-4), from config.json's
    dict `raw`; None for any other model. Raises ValueError for a layout of such a model that is not served."""
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "baichuan" or any(arch in BAICHUAN_ARCHITECTURES for arch in archs):
        return baichuan_config(raw)
    if raw.get("model_type") == "chatglm" or any(arch in CHATGLM_ARCHITECTURES for arch in archs):
        return chatglm_config(raw)
    return None


def is_baichuan2(raw: dict) -> bool:
    """Baichuan2, whose LM head is a NormHead (logits over the rows L2-normalised), not Baichuan 1.

    The sign used is the `z_loss_weight` key: Baichuan2's configuration class (7B and 13B alike) defines it,
    so every config.json it saved carries it, and Baichuan 1's configuration classes have no such field. The
    architecture name cannot tell (BaichuanForCausalLM is both Baichuan2's and Baichuan-13B's class), nor can
    tokenizer_class alone. vLLM's sign, vocab_size 125696 (Baichuan2's vocabulary; Baichuan 1's is 64000), is
    accepted as a second one for a config re-saved without the key; a Baichuan2 fine-tune with a resized
    vocabulary and the key dropped would be missed by both."""
    return "z_loss_weight" in raw or raw.get("vocab_size") == _BAICHUAN2_VOCAB_SIZE


def baichuan_config(raw: dict) -> LlamaConfig:
    """Baichuan / Baichuan2 7B as a LlamaConfig (RoPE theta 10000, RMSNorm, SiLU, untied head); its
    architectures stay Baichuan's so registry._baichuan gives it the W_pack layout, and `normalized_head` marks
    Baichuan2's NormHead.

    The 13B models (Baichuan-13B, Baichuan2-13B) use ALiBi instead of RoPE and are refused. Two signs, either
    enough: their configuration classes have no max_position_embeddings (only model_max_length, which their
    modelling code sizes the ALiBi mask with), while both 7B classes define it, so a config.json saved by a 13B
    class lacks the key; and their shape, hidden_size 5120 with 40 layers (vLLM picks ALiBi by hidden_size
    alone). The key is the sign of the code, the shape that of the released weights; a config with the key and
    the 13B shape is still refused, since which modelling file ships cannot be seen from config.json."""
    name = (raw.get("architectures") or ["Baichuan"])[0]
    signs = []
    if "max_position_embeddings" not in raw:
        signs.append("no max_position_embeddings, only model_max_length")
    if (raw.get("hidden_size"), raw.get("num_hidden_layers")) == _BAICHUAN_13B_SHAPE:
        signs.append("hidden_size 5120 with 40 layers")
    if signs:
        raise ValueError(f"{name}: a Baichuan / Baichuan2 13B config ({'; '.join(signs)}): the 13B models use ALiBi "
                         f"attention, which loraserve does not serve; Baichuan 7B and Baichuan2 7B (RoPE) are served")
    _require(raw, name, ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                         "vocab_size"), "a Baichuan 7B")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act {raw['hidden_act']!r}; Baichuan's MLP is SiLU-gated")
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return LlamaConfig(
        architectures=[name],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_attention_heads"],
        num_hidden_layers=raw["num_hidden_layers"],
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        vocab_size=raw["vocab_size"],
        max_position_embeddings=raw["max_position_embeddings"],
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0),
        normalized_head=is_baichuan2(raw),
        **({"dtype": dtype} if dtype else {}),
    )


def chatglm_config(raw: dict) -> GlmConfig:
    """ChatGLM2 / ChatGLM3 / GLM-4 (the original checkpoints) as a GlmConfig, keys mapped as transformers'
    glm/convert_glm_weights_to_hf.py maps them: RoPE over half of each head (partial_rotary_factor 0.5) with theta
    10000 * rope_ratio, RMSNorm, SiLU-gated MLP, no bias but q/k/v's (add_qkv_bias). The architectures stay
    ChatGLM's so registry._chatglm gives it ChatGLM's module names.

    Refused by name: the first ChatGLM-6B (same model_type, but 2D RoPE, GELU and LayerNorm; its config.json has no
    padded_vocab_size), and the layouts ChatGLM's code can build but no release uses (rmsnorm false: LayerNorm;
    apply_residual_connection_post_layernorm true; add_bias_linear true; post_layer_norm false)."""
    name = (raw.get("architectures") or ["ChatGLMModel"])[0]
    if "position_encoding_2d" in raw or "padded_vocab_size" not in raw:
        raise ValueError(f"{name}: a first-version ChatGLM-6B config (2D RoPE, GELU, LayerNorm; no padded_vocab_size), "
                         f"which loraserve does not serve; ChatGLM2, ChatGLM3 and GLM-4 (model_type chatglm) are "
                         f"served")
    unsupported = {"rmsnorm": (False, "LayerNorm instead of RMSNorm"),
                   "apply_residual_connection_post_layernorm": (True, "the residual taken after the norm"),
                   "add_bias_linear": (True, "biases on every linear layer"),
                   "post_layer_norm": (False, "no final norm")}
    for key, (value, what) in unsupported.items():
        if key in raw and bool(raw[key]) == value:
            raise ValueError(f"{name}: {key}={str(value).lower()} ({what}) is a ChatGLM layout loraserve does not "
                             f"serve; ChatGLM2, ChatGLM3 and GLM-4 are served as released (rmsnorm true, "
                             f"apply_residual_connection_post_layernorm false, add_bias_linear false)")
    _require(raw, name, ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "seq_length"),
             "a ChatGLM2/3 or GLM-4")
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return GlmConfig(
        architectures=[name],
        vocab_size=raw["padded_vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=raw.get("kv_channels") or raw["hidden_size"] // heads,
        hidden_act="silu",
        max_position_embeddings=raw["seq_length"],
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(raw.get("add_qkv_bias", False)),
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * raw.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        partial_rotary_factor=0.5,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0),
        **({"dtype": dtype} if dtype else {}),
    )


def _require(raw: dict, name: str, keys: tuple[str, ...], release: str) -> None:
    missing = [key for key in keys if key not in raw]
    if missing:
        raise ValueError(f"{name}: config.json lacks {', '.join(missing)}; {release} config.json has them")
