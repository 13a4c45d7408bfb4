"""Baichuan / Baichuan2 7B served natively from their original checkpoint layout (config.json with auto_map, q/k/v
packed as W_pack, Baichuan2's NormHead) against transformers' Llama on the same weights converted (W_pack split
into q/k/v, the NormHead's rows normalised), with and without PEFT adapters naming Baichuan's modules. The
checkpoint's own code files are stand-ins that raise when imported: none of them may run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve import LLM
from native_checkpoints import (
    ENGINE_ARGS,
    PROMPTS,
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

SIZES = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# the keys each release's config.json adds (Baichuan 7B's class is spelled with a capital C)
VARIANTS = {
    "baichuan": dict(architectures=["BaiChuanForCausalLM"]),
    "baichuan2": dict(architectures=["BaichuanForCausalLM"], tokenizer_class="BaichuanTokenizer",
                      model_max_length=512, z_loss_weight=0),
}
CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
ADAPTER_TARGETS = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]


def baichuan_config(variant: str, **overrides) -> dict:
    arch = VARIANTS[variant]["architectures"][0]
    return {**SIZES, "model_type": "baichuan", "hidden_act": "silu", "tie_word_embeddings": False,
            "torch_dtype": "float32", "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                                   "AutoModelForCausalLM": f"modeling_baichuan.{arch}"},
            **VARIANTS[variant], **overrides}


def reference_llama(variant: str, seed: int = 0) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A random sharpened Llama with Baichuan's shape (multi-head attention, untied head), and the LM head as
    the Baichuan checkpoint stores it: for Baichuan2 rows of varied norms whose normalisation is the Llama's."""
    config = LlamaConfig(**SIZES, num_key_value_heads=SIZES["num_attention_heads"], tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    model = random_sharp(LlamaForCausalLM, config, seed)
    with torch.no_grad():
        stored_head = model.lm_head.weight.clone()
        if variant == "baichuan2":
            stored_head *= 0.2 + 3 * torch.rand(stored_head.shape[0], 1)
            model.lm_head.weight.copy_(F.normalize(stored_head, dim=-1))
    return model, stored_head


def write_baichuan(model: LlamaForCausalLM, stored_head: torch.Tensor, variant: str, folder: Path) -> Path:
    """The Baichuan checkpoint of `model`: q/k/v rows stacked into W_pack, the stored LM head, config.json with
    auto_map, the code files (stand-ins that raise) and a tokenizer.json whose tokenizer_config maps to code."""
    folder.mkdir(parents=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    for layer in range(SIZES["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        state[f"{prefix}W_pack.weight"] = torch.cat([state.pop(f"{prefix}{p}_proj.weight") for p in "qkv"])
    state["lm_head.weight"] = stored_head.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(baichuan_config(variant)))
    write_code_stand_ins(folder, CODE_FILES, "BaichuanTokenizer", "tokenization_baichuan")
    return folder


def write_adapters(model: LlamaForCausalLM, folder: Path) -> tuple[Path, Path]:
    """A PEFT adapter on Baichuan's modules (W_pack, o_proj, gate/up/down_proj) and its reference on the converted
    Llama."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return write_packed_adapter(model, folder, targets, "W_pack", ADAPTER_TARGETS)


def build(root: Path, variant: str) -> Served:
    hf, stored_head = reference_llama(variant)
    adapter, reference = write_adapters(hf, root / "adapters")
    served = Served(write_baichuan(hf, stored_head, variant, root / "checkpoint"), hf, adapter, reference)
    served.stored_head = stored_head
    return served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return cached(build, tmp_path_factory)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers_llama(served, variant):
    model = served(variant)
    assert model.llm.engine.model.spec.packed_qkv == "W_pack"
    assert model.llm.engine.model.spec.normalized_head == (variant == "baichuan2")
    check_matches_reference(model, variant)


def test_baichuan2_head_is_normalised_where_baichuan_head_is_not(served):
    """Without the fold Baichuan2's logits would be the stored head's, far from the reference's."""
    model = served("baichuan2")
    with torch.no_grad():
        hidden = model.hf.model(torch.tensor([model.ids(PROMPTS[0])])).last_hidden_state[0]
    unfolded = hidden @ model.stored_head.T
    assert (unfolded - model.hf.lm_head(hidden)).abs().max().item() > 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_on_w_pack_matches_peft_on_the_converted_llama(served, variant):
    check_adapter_matches_peft(served(variant), variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batch_with_and_without_the_adapter_equals_each_alone(served, variant):
    check_mixed_batch(served(variant), variant)


@pytest.mark.parametrize("overrides, sign", [
    (dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13696, num_attention_heads=40,
          vocab_size=125696, max_position_embeddings=None, model_max_length=4096), "no max_position_embeddings"),
    (dict(max_position_embeddings=None, model_max_length=512), "no max_position_embeddings"),
    (dict(hidden_size=5120, num_hidden_layers=40), "hidden_size 5120 with 40 layers"),
])
def test_13b_alibi_layouts_are_refused_by_name(tmp_path, overrides, sign):
    config = {k: v for k, v in baichuan_config("baichuan2", **overrides).items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Baichuan / Baichuan2 13B") as error:
        LLM(str(tmp_path), **ENGINE_ARGS)
    assert sign in str(error.value) and "ALiBi" in str(error.value) and "BaichuanForCausalLM" in str(error.value)


def test_folder_without_tokenizer_json_is_refused_with_the_conversion(served, tmp_path):
    message = refusal_without_tokenizer_json(served("baichuan").path, tmp_path)
    assert "tokenization_baichuan.BaichuanTokenizer" in message and "LlamaTokenizerFast" in message
    assert "tokenizer.model" in message and "runs no checkpoint code" in message
