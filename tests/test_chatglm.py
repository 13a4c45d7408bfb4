"""ChatGLM2 / ChatGLM3 / GLM-4 served natively from their original checkpoint layout (config.json with auto_map and
ChatGLM's keys, weights under transformer.encoder..., q/k/v packed as query_key_value, [gate; up] as dense_h_to_4h)
against transformers' GlmForCausalLM on the same weights converted as glm/convert_glm_weights_to_hf.py converts
them, with and without PEFT adapters naming ChatGLM's modules. The checkpoint's own code files are stand-ins that
raise when imported: none of them may run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

from loraserve import LLM
from loraserve.lora.merge import merge_adapter
from native_checkpoints import (
    ENGINE_ARGS,
    Served,
    cached,
    check_adapter_matches_peft,
    check_matches_reference,
    check_mixed_batch,
    random_sharp,
    refusal_without_tokenizer_json,
    write_code_stand_ins,
    write_packed_adapter,
)

HIDDEN, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2
# config.json's keys as ChatGLM2/3 and GLM-4's configuration class saves them
CHATGLM_KEYS = dict(padded_vocab_size=272, hidden_size=HIDDEN, ffn_hidden_size=96, num_layers=LAYERS,
                    num_attention_heads=HEADS, kv_channels=HEAD_DIM, seq_length=512, layernorm_epsilon=1e-5,
                    rmsnorm=True, apply_residual_connection_post_layernorm=False, post_layer_norm=True,
                    add_bias_linear=False, original_rope=True, bias_dropout_fusion=True, fp32_residual_connection=False,
                    apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True, hidden_dropout=0.0,
                    attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# ChatGLM3-like: multi-query attention (2 groups), q/k/v biases; GLM-4-like: rope_ratio 500; a third with plain
# multi-head attention and no biases
VARIANTS = {
    "chatglm3": dict(architectures=["ChatGLMModel"], multi_query_attention=True, multi_query_group_num=2,
                     add_qkv_bias=True),
    "glm4": dict(architectures=["ChatGLMForConditionalGeneration"], multi_query_attention=True,
                 multi_query_group_num=1, add_qkv_bias=True, rope_ratio=500),
    "mha": dict(architectures=["ChatGLMModel"], multi_query_attention=False, multi_query_group_num=2,
                add_qkv_bias=False),
}
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
ADAPTER_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# the converted GLM's names -> ChatGLM's (the reverse of convert_glm_weights_to_hf.py's mapping)
TO_CHATGLM = (("model.embed_tokens.", "transformer.embedding.word_embeddings."),
              ("model.norm.", "transformer.encoder.final_layernorm."),
              ("model.layers.", "transformer.encoder.layers."), (".self_attn.", ".self_attention."),
              (".o_proj.", ".dense."), (".gate_up_proj.", ".dense_h_to_4h."), (".down_proj.", ".dense_4h_to_h."),
              ("lm_head.", "transformer.output_layer."))


def chatglm_config(variant: str, **overrides) -> dict:
    return {"model_type": "chatglm", "torch_dtype": "float32", "tie_word_embeddings": False,
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            **CHATGLM_KEYS, **VARIANTS[variant], **overrides}


def to_chatglm(name: str) -> str:
    for ours, theirs in TO_CHATGLM:
        name = name.replace(ours, theirs)
    return name


def reference_glm(variant: str, seed: int = 0) -> GlmForCausalLM:
    """A random sharpened GlmForCausalLM: the config convert_glm_weights_to_hf.py writes for the variant."""
    raw = chatglm_config(variant)
    kv_heads = raw["multi_query_group_num"] if raw["multi_query_attention"] else HEADS
    config = GlmConfig(vocab_size=raw["padded_vocab_size"], hidden_size=HIDDEN,
                       intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                       head_dim=HEAD_DIM, max_position_embeddings=raw["seq_length"],
                       rms_norm_eps=raw["layernorm_epsilon"], attention_bias=raw["add_qkv_bias"],
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * raw.get("rope_ratio", 1),
                                        "partial_rotary_factor": 0.5})
    config.architectures = ["GlmForCausalLM"]
    return random_sharp(GlmForCausalLM, config, seed)


def write_chatglm(model: GlmForCausalLM, variant: str, folder: Path) -> Path:
    """The ChatGLM checkpoint of `model`: q/k/v rows (and biases) stacked into query_key_value, ChatGLM's names,
    the rotary inv_freq buffer it saves, config.json with auto_map, the code files (stand-ins that raise) and a
    tokenizer.json whose tokenizer_config maps to code."""
    folder.mkdir(parents=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}.self_attn."
        for param in ("weight", "bias"):
            if f"{prefix}q_proj.{param}" in state:
                state[f"{prefix}query_key_value.{param}"] = torch.cat(
                    [state.pop(f"{prefix}{p}_proj.{param}") for p in "qkv"])
    state = {to_chatglm(name): tensor for name, tensor in state.items()}
    rotary_dim = HEAD_DIM // 2
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(chatglm_config(variant)))
    write_code_stand_ins(folder, CODE_FILES, "ChatGLMTokenizer", "tokenization_chatglm")
    return folder


def write_adapters(model: GlmForCausalLM, folder: Path) -> tuple[Path, Path]:
    """A PEFT adapter on ChatGLM's modules (query_key_value, dense, dense_h_to_4h, dense_4h_to_h under
    transformer.encoder.layers.N) and its reference on the converted GLM."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    return write_packed_adapter(model, folder, targets, "query_key_value", ADAPTER_TARGETS, to_chatglm)


def build(root: Path, variant: str) -> Served:
    hf = reference_glm(variant)
    adapter, reference = write_adapters(hf, root / "adapters")
    return Served(write_chatglm(hf, variant, root / "checkpoint"), hf, adapter, reference)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return cached(build, tmp_path_factory)


def chatglm_rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """ChatGLM2/3's rotary embedding as its modelling code computes it (RotaryEmbedding(kv_channels // 2) and
    apply_rotary_pos_emb), x: [tokens, heads, head_dim]: the first half of each head rotated in (x0, x1) pairs."""
    dim = x.shape[-1] // 2
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    cache = torch.outer(positions.float(), theta)
    cache = torch.stack([torch.cos(cache), torch.sin(cache)], dim=-1)[:, None]  # [tokens, 1, dim / 2, 2]
    rotated, passed = x[..., :dim], x[..., dim:]
    pairs = rotated.reshape(*rotated.shape[:-1], dim // 2, 2)
    out = torch.stack([pairs[..., 0] * cache[..., 0] - pairs[..., 1] * cache[..., 1],
                       pairs[..., 1] * cache[..., 0] + pairs[..., 0] * cache[..., 1]], dim=-1)
    return torch.cat((out.flatten(-2), passed), dim=-1)


@pytest.mark.parametrize("variant", ["chatglm3", "glm4"])
def test_the_reference_glm_rotates_and_gates_as_chatglm_does(variant):
    """The conversion the reference rests on: GLM's partial interleaved RoPE is ChatGLM's (theta 10000 *
    rope_ratio), and GLM's gate_up MLP is ChatGLM's swiglu over dense_h_to_4h (silu of the first half times the
    second)."""
    model = reference_glm(variant)
    positions = torch.arange(0, 300, 7)
    x = torch.randn(len(positions), HEADS, HEAD_DIM)
    cos, sin = model.model.rotary_emb(x, positions[None])
    ours, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
    base = 10000.0 * chatglm_config(variant).get("rope_ratio", 1)
    assert (ours[0].transpose(0, 1) - chatglm_rotary(x, positions, base)).abs().max().item() < 1e-4
    mlp = model.model.layers[0].mlp
    h = torch.randn(5, HIDDEN)
    gate, up = torch.chunk(h @ mlp.gate_up_proj.weight.T, 2, dim=-1)
    with torch.no_grad():
        assert torch.allclose(mlp(h), (torch.nn.functional.silu(gate) * up) @ mlp.down_proj.weight.T, atol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers_glm(served, variant):
    model = served(variant)
    spec = model.llm.engine.model.spec
    assert spec.packed_qkv == "query_key_value" and spec.rope_interleaved
    assert spec.num_kv_heads == model.hf.config.num_key_value_heads and spec.qkv_bias == model.hf.config.attention_bias
    check_matches_reference(model, variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_on_chatglm_modules_matches_peft_on_the_converted_glm(served, variant):
    check_adapter_matches_peft(served(variant), variant)


def test_adapter_file_holds_chatglm_names(served):
    keys = load_file(str(served("chatglm3").adapter_path / "adapter_model.safetensors"))
    assert all(key.startswith("base_model.model.transformer.encoder.layers.") for key in keys)
    assert {key.split(".")[-3] for key in keys} == set(ADAPTER_TARGETS)


@pytest.mark.parametrize("variant", ["chatglm3"])
def test_mixed_batch_with_and_without_the_adapter_equals_each_alone(served, variant):
    check_mixed_batch(served(variant), variant)


def test_merge_folds_the_adapter_into_chatglm_tensors(served, tmp_path):
    """merge reads ChatGLM's names too: the merged folder keeps the original layout and holds PEFT's merged
    weights (q/k/v stacked again)."""
    model = served("chatglm3")
    merged_dir = merge_adapter(str(model.path), str(model.adapter_path), tmp_path / "merged")
    merged = load_file(str(merged_dir / "model.safetensors"))
    original = load_file(str(model.path / "model.safetensors"))
    assert set(merged) == set(original)
    with torch.no_grad():
        reference = copy.deepcopy(model.hf_lora).merge_and_unload()
    expected = write_chatglm(reference, "chatglm3", tmp_path / "expected") / "model.safetensors"
    for name, tensor in load_file(str(expected)).items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-5)
    changed = {name.split(".")[-2] for name in merged if not torch.equal(merged[name], original[name])}
    assert changed == set(ADAPTER_TARGETS)
    assert (merged_dir / "modeling_chatglm.py").is_file()


@pytest.mark.parametrize("overrides, match", [
    (dict(rmsnorm=False), "rmsnorm=false"),
    (dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm=true"),
    (dict(add_bias_linear=True), "add_bias_linear=true"),
    (dict(padded_vocab_size=None, vocab_size=130528, position_encoding_2d=True), "first-version ChatGLM-6B"),
])
def test_unserved_layouts_are_refused_by_name(tmp_path, overrides, match):
    config = {k: v for k, v in chatglm_config("chatglm3", **overrides).items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match) as error:
        LLM(str(tmp_path), **ENGINE_ARGS)
    assert "ChatGLMModel" in str(error.value)


def test_folder_without_tokenizer_json_is_refused(served, tmp_path):
    message = refusal_without_tokenizer_json(served("chatglm3").path, tmp_path)
    assert "tokenization_chatglm.ChatGLMTokenizer" in message and "runs no checkpoint code" in message
    assert "transformers-format release" in message and "LlamaTokenizerFast" not in message
