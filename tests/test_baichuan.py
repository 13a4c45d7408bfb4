"""Baichuan / Baichuan2 7B served natively from their original checkpoint layout (config.json with auto_map, q/k/v
packed as W_pack, Baichuan2's NormHead) against transformers' Llama on the same weights converted (W_pack split
into q/k/v, the NormHead's rows normalised), with and without PEFT adapters naming Baichuan's modules. The
checkpoint's own code files are stand-ins that raise when imported: none of them may run."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve import LLM, LoRARequest, SamplingParams
from test_lora_fidelity import engine_logits
from tiny_models import byte_tokenizer

NEW_TOKENS = 32
TOLERANCE = 1e-4
PROMPTS = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy dog; then it",
           "0123456789 counting: 10 11 12 13 14 15 16 17 18 19 20 21 22"]
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, num_kv_blocks=96, block_size=4, enable_lora=True, max_loras=2)
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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # sharper weights: varied, position-dependent text (tiny_models.make_sharp_tiny_model)
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(10.0)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
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
    for name in CODE_FILES:
        (folder / name).write_text(f"raise RuntimeError('checkpoint code {name} ran')\n")
    byte_tokenizer().save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="BaichuanTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def write_adapters(model: LlamaForCausalLM, folder: Path, seed: int = 1) -> tuple[Path, Path]:
    """A PEFT adapter on Baichuan's modules (W_pack, o_proj, gate/up/down_proj) and its reference on the converted
    Llama: a LoRA on W_pack has one A and one B of q+k+v rows, which on q/k/v is A shared and B split by rows."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    hidden = SIZES["hidden_size"]
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for layer in peft_model.base_model.model.model.layers:
            attention = layer.self_attn
            lora_a = torch.randn(4, hidden, generator=generator) * 0.1
            lora_b = torch.randn(3 * hidden, 4, generator=generator) * 0.1
            for index, part in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
                part.lora_A["default"].weight.copy_(lora_a)
                part.lora_B["default"].weight.copy_(lora_b[index * hidden:(index + 1) * hidden])
    reference = folder / "llama-reference"
    peft_model.save_pretrained(reference)
    tensors = load_file(str(reference / "adapter_model.safetensors"))
    packed = {name: [tensor] for name, tensor in tensors.items() if not any(f".{p}_proj." in name for p in "qkv")}
    for name in tensors:  # the file's keys are sorted (k before q): stack in q, k, v order
        if ".q_proj." in name:
            packed[name.replace("q_proj", "W_pack")] = [tensors[name.replace("q_proj", f"{p}_proj")] for p in "qkv"]
    baichuan = folder / "baichuan"
    baichuan.mkdir()
    # W_pack's A: the shared one (q's, k's and v's are equal); its B: q's, k's and v's rows stacked
    save_file({name: (parts[0] if ".lora_A." in name else torch.cat(parts)).contiguous()
               for name, parts in packed.items()}, str(baichuan / "adapter_model.safetensors"))
    adapter_config = json.loads((reference / "adapter_config.json").read_text())
    adapter_config["target_modules"] = ADAPTER_TARGETS
    (baichuan / "adapter_config.json").write_text(json.dumps(adapter_config))
    return baichuan, reference


class Served:
    def __init__(self, root: Path, variant: str) -> None:
        self.hf, stored_head = reference_llama(variant)
        self.stored_head = stored_head
        self.path = write_baichuan(self.hf, stored_head, variant, root / "checkpoint")
        adapter, reference = write_adapters(self.hf, root / "adapters")
        self.lora = LoRARequest("baichuan-adapter", 1, str(adapter))
        self.hf_lora = PeftModel.from_pretrained(copy.deepcopy(self.hf), str(reference)).eval()
        self.llm = LLM(str(self.path), **ENGINE_ARGS)

    def ids(self, prompt: str) -> list[int]:
        return self.llm.get_tokenizer().encode(prompt)

    def greedy(self, model, prompt: str) -> list[int]:
        out = model.generate(torch.tensor([self.ids(prompt)]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS)
        return out[0, -NEW_TOKENS:].tolist()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    built: dict[str, Served] = {}

    def get(variant: str) -> Served:
        if variant not in built:
            built[variant] = Served(tmp_path_factory.mktemp(variant), variant)
        return built[variant]

    return get


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers_llama(served, variant):
    model = served(variant)
    assert model.llm.engine.model.spec.packed_qkv == "W_pack"
    assert model.llm.engine.model.spec.normalized_head == (variant == "baichuan2")
    ids = {prompt: model.ids(prompt) for prompt in PROMPTS}
    logits = engine_logits(model.llm, ids, {})
    for prompt, prompt_ids in ids.items():
        with torch.no_grad():
            expected = model.hf(torch.tensor([prompt_ids])).logits[0]
        assert (logits[prompt] - expected).abs().max().item() <= TOLERANCE, f"{variant}: {prompt!r}"
    outputs = model.llm.generate(PROMPTS, greedy_params(), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == model.greedy(model.hf, prompt), f"{variant}: {prompt!r}"
    assert len(set(model.greedy(model.hf, PROMPTS[0]))) > NEW_TOKENS // 4  # varied text: the test has power


def test_baichuan2_head_is_normalised_where_baichuan_head_is_not(served):
    """Without the fold Baichuan2's logits would be the stored head's, far from the reference's."""
    model = served("baichuan2")
    with torch.no_grad():
        hidden = model.hf.model(torch.tensor([model.ids(PROMPTS[0])])).last_hidden_state[0]
    unfolded = hidden @ model.stored_head.T
    assert (unfolded - model.hf.lm_head(hidden)).abs().max().item() > 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_on_w_pack_matches_peft_on_the_converted_llama(served, variant):
    model = served(variant)
    ids = {prompt: model.ids(prompt) for prompt in PROMPTS[:2]}
    logits = engine_logits(model.llm, ids, {prompt: model.lora for prompt in ids})
    for prompt, prompt_ids in ids.items():
        with torch.no_grad():
            expected = model.hf_lora(input_ids=torch.tensor([prompt_ids])).logits[0]
            base = model.hf(torch.tensor([prompt_ids])).logits[0]
        assert (logits[prompt] - expected).abs().max().item() <= TOLERANCE, f"{variant}: {prompt!r}"
        assert (expected - base).abs().max().item() > 0.1  # the adapter changes the logits
    output = model.llm.generate(PROMPTS[2], greedy_params(), lora_request=model.lora, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == model.greedy(model.hf_lora, PROMPTS[2])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_batch_with_and_without_the_adapter_equals_each_alone(served, variant):
    model = served(variant)
    loras = [None, model.lora, model.lora, None]
    together = model.llm.generate(PROMPTS, greedy_params(), lora_request=loras, use_tqdm=False)
    for prompt, lora, output in zip(PROMPTS, loras, together, strict=True):
        alone = model.llm.generate(prompt, greedy_params(), lora_request=lora, use_tqdm=False)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids, f"{variant}: {prompt!r}, {lora}"
    assert together[0].outputs[0].token_ids == model.greedy(model.hf, PROMPTS[0])
    assert together[1].outputs[0].token_ids == model.greedy(model.hf_lora, PROMPTS[1])


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
    folder = shutil.copytree(served("baichuan").path, tmp_path / "no-tokenizer-json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer\.json") as error:
        LLM(str(folder), **ENGINE_ARGS)
    message = str(error.value)
    assert "tokenization_baichuan.BaichuanTokenizer" in message and "LlamaTokenizerFast" in message
    assert "tokenizer.model" in message and "runs no checkpoint code" in message
