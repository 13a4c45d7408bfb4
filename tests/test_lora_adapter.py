"""load_adapter against PEFT's own reading of the same saved adapters, and every refusal by its message."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from peft import IA3Config, get_peft_model
from safetensors.torch import load_file, save_file

from lora_fixtures import make_peft_adapter, peft_lora_layers, target_spec, tiny_gpt2, tiny_llama
from loraserve.lora.adapter import AdapterNotFoundError, LoRAError, load_adapter, resolve_adapter_path
from loraserve.lora.request import LoRARequest

QV = ["q_proj", "v_proj"]
ALL_LEAVES = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def spec(llama):
    return target_spec(llama)


def load(path: Path, spec, *, max_lora_rank: int = 64, dtype: torch.dtype = torch.float32, name: str = "x"):
    return load_adapter(LoRARequest(name, 1, str(path)), spec, max_lora_rank, dtype)


def expect_error(path: Path, spec, message: str, error: type[Exception] = LoRAError, **kwargs) -> None:
    with pytest.raises(error, match=re.escape(message)):
        load(path, spec, **kwargs)


def edit_config(path: Path, **changes) -> None:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:
    weights_file = path / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    edit(tensors)
    save_file(tensors, weights_file)


def assert_matches_peft(adapter, model, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Same modules, A, scaling-folded B and rank as PEFT loading the same folder."""
    reference = peft_lora_layers(model, path)
    assert set(adapter.modules) == set(reference)
    for name, layer in reference.items():
        ref_a = layer.lora_A["default"].weight.detach()
        ref_b = layer.lora_B["default"].weight.detach()
        got = adapter.modules[name]
        assert got.rank == ref_a.shape[0] == ref_b.shape[1]
        assert got.lora_a.dtype == got.lora_b.dtype == dtype
        torch.testing.assert_close(got.lora_a, ref_a.to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(got.lora_b, (ref_b.float() * layer.scaling["default"]).to(dtype), rtol=0, atol=0)
    assert adapter.max_rank == max(w.rank for w in adapter.modules.values())
    assert adapter.nbytes == sum(w.lora_a.numel() + w.lora_b.numel() for w in adapter.modules.values()) * (
        torch.finfo(dtype).bits // 8
    )


CASES = {
    "r8": dict(r=8, lora_alpha=16, target_modules=QV),
    "r16_all_leaves": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]),
    "r64": dict(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=QV),
    "rank_alpha_pattern": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"layers.0.self_attn.q_proj": 4, "down_proj": 12},
                               alpha_pattern={"v_proj": 32, r"layers\.1\.mlp\.down_proj": 3}),
    "layers_to_transform": dict(r=8, target_modules=QV, layers_to_transform=[1]),
    "layers_pattern": dict(r=8, target_modules=["o_proj"], layers_to_transform=0, layers_pattern="layers"),
    "exclude_modules": dict(r=8, target_modules=QV, exclude_modules=["layers.0.self_attn.q_proj"]),
    "subset": dict(r=4, lora_alpha=4, target_modules=["o_proj"]),
    "all_linear": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "regex": dict(r=8, lora_alpha=16, target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj"),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(case, llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / case, **CASES[case])
    adapter = load(path, spec)
    assert_matches_peft(adapter, llama, path)
    assert adapter.path == str(path.resolve()) and adapter.name == "x" and adapter.int_id == 1
    assert adapter.base_model_name == "tiny-llama"


def test_rank_and_alpha_patterns_pick_per_module_values(llama, spec, tmp_path):
    """The PEFT reference above could share a misreading with us; pin the formula alpha/r per module."""
    adapter = load(make_peft_adapter(llama, tmp_path / "a", **CASES["rank_alpha_pattern"]), spec)
    raw = load_file(tmp_path / "a" / "adapter_model.safetensors")
    expected = {  # module: (rank, alpha)
        "model.layers.0.self_attn.q_proj": (4, 16), "model.layers.1.self_attn.q_proj": (8, 16),
        "model.layers.0.self_attn.v_proj": (8, 32), "model.layers.0.mlp.down_proj": (12, 16),
        "model.layers.1.mlp.down_proj": (12, 3),
    }
    for module, (rank, alpha) in expected.items():
        b = raw[f"base_model.model.{module}.lora_B.weight"]
        assert adapter.modules[module].rank == rank
        torch.testing.assert_close(adapter.modules[module].lora_b, b * (alpha / rank))


def test_rslora_scale_is_alpha_over_sqrt_rank(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=16, lora_alpha=8, use_rslora=True, target_modules=QV)
    adapter = load(path, spec)
    raw = load_file(tmp_path / "a" / "adapter_model.safetensors")
    module = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(adapter.modules[module].lora_b, raw[f"base_model.model.{module}.lora_B.weight"] * 2.0)


def test_bfloat16_folds_scale_in_float32(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, lora_alpha=24, target_modules=QV)
    assert_matches_peft(load(path, spec, dtype=torch.bfloat16), llama, path, dtype=torch.bfloat16)


def test_legacy_bin(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV, safe_serialization=False)
    assert (path / "adapter_model.bin").is_file() and not (path / "adapter_model.safetensors").exists()
    assert_matches_peft(load(path, spec), llama, path)


def test_keys_with_adapter_name(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)

    def add_default(tensors):
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    edit_weights(path, add_default)
    assert_matches_peft(load(path, spec), llama, path)


def test_delta_matches_peft_forward(llama, spec, tmp_path):
    """x @ A.T @ B.T is exactly what PEFT's layer adds to the base layer's output."""
    path = make_peft_adapter(llama, tmp_path / "a", **CASES["rank_alpha_pattern"])
    adapter = load(path, spec)
    x = torch.randn(3, 128)
    for name, layer in peft_lora_layers(llama, path).items():
        inputs = x[:, : spec.modules[name][0]]
        with torch.no_grad():
            peft_delta = layer(inputs) - layer.get_base_layer()(inputs)
        weights = adapter.modules[name]
        torch.testing.assert_close(inputs @ weights.lora_a.T @ weights.lora_b.T, peft_delta)


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D stores its base weight [in, out]; PEFT still saves A [r, in] and B [out, r]."""
    gpt2 = tiny_gpt2()
    spec = target_spec(gpt2)
    path = make_peft_adapter(gpt2, tmp_path / "a", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True)
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    adapter = load(path, spec)
    assert_matches_peft(adapter, gpt2, path)
    x = torch.randn(3, 32)
    layer = peft_lora_layers(gpt2, path)["transformer.h.0.attn.c_attn"]
    with torch.no_grad():
        peft_delta = layer(x) - layer.get_base_layer()(x)
    weights = adapter.modules["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(x @ weights.lora_a.T @ weights.lora_b.T, peft_delta)


def test_hub_id_from_local_cache(llama, spec, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-lora"
    make_peft_adapter(llama, repo / "snapshots" / commit, r=8, target_modules=QV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_adapter_path("someone/tiny-lora") == repo / "snapshots" / commit
    assert_matches_peft(load(Path("someone/tiny-lora"), spec), llama, repo / "snapshots" / commit)
    with pytest.raises(AdapterNotFoundError, match="neither an existing folder nor a hub id in the local"):
        resolve_adapter_path("someone/not-cached")


# ---- refusals -------------------------------------------------------------------------------------------


def test_rank_above_max(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=64, target_modules=QV)
    expect_error(path, spec, "LoRA rank 64 of adapter 'x' exceeds max_lora_rank=16; restart with --max-lora-rank 64",
                 max_lora_rank=16)
    path = make_peft_adapter(llama, tmp_path / "b", r=8, target_modules=QV, rank_pattern={"v_proj": 32})
    expect_error(path, spec, "LoRA rank 32 of adapter 'x' exceeds max_lora_rank=16", max_lora_rank=16)


def test_target_entry_matching_nothing(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_config(path, target_modules=["q_proj", "query_key_value"])
    expect_error(path, spec, "target_modules entry 'query_key_value' of adapter 'x' matches no module of model "
                 f"'tiny-llama'; its adaptable modules are: {ALL_LEAVES}")
    edit_config(path, target_modules=r".*\.attention\.dense")
    expect_error(path, spec, r"target_modules regex '.*\\.attention\\.dense' of adapter 'x' matches no module")


def test_weights_for_module_model_lacks(spec, tmp_path):
    deeper = tiny_llama("deep-llama", num_hidden_layers=3)
    path = make_peft_adapter(deeper, tmp_path / "a", r=8, target_modules=QV)
    expect_error(path, spec, "adapter 'x' has LoRA weights for module 'model.layers.2.self_attn.q_proj', which model "
                 "'tiny-llama' does not have")
    expect_error(path, spec, "likely trained for another base model (base_model_name_or_path='deep-llama'), this "
                 "server runs 'tiny-llama'")


def test_shapes_of_another_base_model(spec, tmp_path):
    narrow = tiny_llama("narrow-llama", hidden_size=32)
    path = make_peft_adapter(narrow, tmp_path / "a", r=8, target_modules=QV)
    expect_error(path, spec, "expected lora_A (8, 64) and lora_B (64, 8), got (8, 32) and (32, 8); the adapter was "
                 "likely trained for another base model (base_model_name_or_path='narrow-llama'), this server runs "
                 "'tiny-llama'")


def test_config_rank_disagreeing_with_weights(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_config(path, r=4)
    expect_error(path, spec, "got (8, 64) and (64, 8); the rank r=4 that adapter_config.json gives this module")


def test_missing_files(llama, spec, tmp_path):
    expect_error(tmp_path / "nowhere", spec, "'" + str(tmp_path / "nowhere") + "' is neither an existing folder",
                 AdapterNotFoundError)
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    expect_error(path / "adapter_config.json", spec, "is a file; pass the folder holding adapter_config.json",
                 AdapterNotFoundError)
    (path / "adapter_model.safetensors").unlink()
    expect_error(path, spec, "has adapter_config.json but no weights; expected adapter_model.safetensors (or legacy "
                 "adapter_model.bin)", AdapterNotFoundError)
    (path / "adapter_config.json").unlink()
    expect_error(path, spec, f"adapter 'x': {path} has no adapter_config.json", AdapterNotFoundError)


def test_invalid_json(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    (path / "adapter_config.json").write_text('{"r": 8,')
    expect_error(path, spec, "adapter_config.json is not valid JSON")


def test_truncated_weights(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(path, spec, "adapter_model.safetensors is corrupt or truncated")
    path = make_peft_adapter(llama, tmp_path / "b", r=8, target_modules=QV, safe_serialization=False)
    data = (path / "adapter_model.bin").read_bytes()
    (path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    expect_error(path, spec, "adapter_model.bin is corrupt or not a PyTorch state dict")


def test_refused_features_and_dora_read_without_a_base(llama, spec, tmp_path):
    """modules_to_save of a linear is refused by name; DoRA read without the base (inspecting, merging) keeps
    its magnitudes and takes no norms (an engine always reads with its base)."""
    folder = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV, modules_to_save=["gate_proj"])
    expect_error(folder, spec, "adapter 'x' saves 'model.layers.0.mlp.gate_proj.weight' whole (modules_to_save); "
                               "loraserve serves whole copies of embedding tables")
    folder = make_peft_adapter(llama, tmp_path / "b", r=8, target_modules=QV, use_dora=True)
    adapter = load_adapter(LoRARequest("x", 1, str(folder)), spec, 16, torch.float32)
    assert all(w.magnitude is not None and w.dora_norms is None for w in adapter.modules.values())


def test_new_kinds_read_as_peft_stores_them(llama, spec, tmp_path):
    """lora_B's bias scaled like B; embedding factors kept as PEFT's lora_embedding_A [r, vocab] / B; the head's
    LoRA like any linear; modules_to_save tensors kept whole (minus copies equal to the base's, which only an
    engine can tell); trainable token rows with their ids."""
    path = make_peft_adapter(llama, tmp_path / "bias", r=4, lora_alpha=8, lora_bias=True, target_modules=QV)
    raw = load_file(path / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(load(path, spec).modules[q].bias, raw[f"base_model.model.{q}.lora_B.bias"] * 2.0)
    path = make_peft_adapter(llama, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=["embed_tokens", "lm_head", "q_proj"], modules_to_save=["norm"])
    raw = load_file(path / "adapter_model.safetensors")
    adapter = load(path, spec)
    embed = adapter.modules["model.embed_tokens"]
    torch.testing.assert_close(embed.lora_a, raw["base_model.model.model.embed_tokens.lora_embedding_A"])
    torch.testing.assert_close(embed.lora_b, raw["base_model.model.model.embed_tokens.lora_embedding_B"] * 2.0)
    assert adapter.modules["lm_head"].lora_b.shape == (128, 4)
    assert "model.norm.weight" in adapter.saved and "model.layers.0.input_layernorm.weight" in adapter.saved
    torch.testing.assert_close(adapter.saved["model.norm.weight"], raw["base_model.model.model.norm.weight"])
    assert adapter.added_tokens == 0
    tokens = make_peft_adapter(llama, tmp_path / "b", r=4, target_modules=QV, trainable_token_indices=[3, 7])
    rows = load(tokens, spec).token_rows["model.embed_tokens.weight"]
    assert rows.ids.tolist() == [3, 7]
    torch.testing.assert_close(rows.rows, load_file(tokens / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"])


def test_saved_tensor_the_config_does_not_explain(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_weights(path, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(64)}))
    expect_error(path, spec, "adapter 'x' holds tensor 'model.norm.weight', which is not a LoRA weight, and its "
                 "adapter_config.json neither saves that module (modules_to_save=[]) nor trains biases (bias='none')")


def test_other_peft_type(llama, spec, tmp_path):
    get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"],
                                           feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "a")
    expect_error(tmp_path / "a", spec, "adapter 'x' has peft_type 'IA3'; only LoRA adapters (peft_type 'LORA')")


def test_selects_no_module(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_config(path, layers_to_transform=[5])
    expect_error(path, spec, "adapter 'x' selects no module of model 'tiny-llama'")
    expect_error(path, spec, "so it would change nothing")


def test_no_tensors_for_targets(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_weights(path, dict.clear)
    expect_error(path, spec, "adapter 'x' targets 4 modules of model 'tiny-llama' but its weights file holds no LoRA "
                 "tensors for any of them, so it would change nothing")
    path = make_peft_adapter(llama, tmp_path / "b", r=8, target_modules=QV)
    edit_weights(path, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    expect_error(path, spec, "adapter 'x': its weights file holds no LoRA tensors for 2 of the 4 modules it targets "
                 "(first: 'model.layers.1.self_attn.q_proj'); the weights file is incomplete")


def test_weights_for_untargeted_module(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_config(path, target_modules=["q_proj"])
    expect_error(path, spec, "adapter 'x' has LoRA weights for module 'model.layers.0.self_attn.v_proj', which its "
                 "adapter_config.json does not target")


def test_expert_targets_on_a_dense_model_are_refused_by_name(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_config(path, target_parameters=["experts.gate_up_proj"])
    expect_error(path, spec, "target_parameters entry 'experts.gate_up_proj' of adapter 'x' matches no tensor of "
                 "model 'tiny-llama'; it has no routed experts, so only target_modules apply to it")


def test_missing_partner(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=8, target_modules=QV)
    edit_weights(path, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    expect_error(path, spec, "adapter 'x' has lora_A but no lora_B for module 'model.layers.1.self_attn.v_proj'")


def test_whole_copies_past_the_budget_are_refused_naming_the_flag(llama, spec, tmp_path):
    path = make_peft_adapter(llama, tmp_path / "a", r=4, target_modules=QV, modules_to_save=["lm_head"])
    assert load(path, spec).saved["lm_head.weight"].shape == (128, 64)  # 32 KiB in fp32
    tight = dataclasses.replace(spec, max_saved_bytes=16 * 2**10)
    expect_error(path, tight, "adapter 'x' brings 0.0 MiB of whole copies (modules_to_save: lm_head.weight; token "
                 "rows), more than one adapter may hold here (--max-lora-saved-mb 0.015625); raise it")
