"""Tiny random checkpoints of every supported architecture, built with transformers and saved as HF
folders, so the engine is checked against transformers on the same weights."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-2 special, then the 256 byte symbols; no merges, so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

COMMON = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, num_key_value_heads=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, original_max_position_embeddings=512)),
    # sliding window 8 on layer 0 (every prompt outgrows it), soft-capped scores and logits, query scaling
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        attn_logit_softcapping=20.0, final_logit_softcapping=15.0, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(tie_word_embeddings=False,
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                         "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=4.0)})),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16, partial_rotary_factor=0.5)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=32, partial_rotary_factor=0.5, attention_bias=True)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                            sliding_window=None)),
    # layer 1 keeps a dense MLP; a shared expert beside 4 routed ones, top-2 probabilities not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128, multi_query=True)),
    "gpt_bigcode_mha": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=128, multi_query=False,
        activation_function="gelu")),
}


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of `arch` (a key of ARCHITECTURES; config `overrides` on top) with a
    byte-level tokenizer copy."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # random norms and biases so a mistake in their handling shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    byte_tokenizer().save_pretrained(out_dir)
    return Path(out_dir)


def make_sharp_tiny_model(arch: str, out_dir: Path, seed: int = 0, factor: float = 10.0, **overrides) -> Path:
    """make_tiny_model with every weight matrix scaled by `factor`.

    At the default init (std 0.02) attention is nearly uniform, so positions barely change the logits, and
    tied heads just echo the last input token: greedy text is one token repeated and a rotary or masking
    bug would go unseen. Sharper weights give varied, position-dependent generations."""
    path = make_tiny_model(arch, out_dir, seed, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:  # matrices, and the fused [experts, out, in] stacks of MoE models
                param.mul_(factor)
    model.save_pretrained(path)
    return path
