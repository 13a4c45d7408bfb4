"""Quantized bases with LoRA on top, served against transformers + PEFT on the de-quantized weights (fp32):
base and every adapter in one mixed batch, greedy tokens identical, logits within 1e-4 (test_lora_fidelity's
bar).

- GPTQ / AWQ / compressed-tensors checkpoints written by the formats' own tools (gptqmodel, AutoAWQ,
  compressed-tensors; tests/fixtures/quantized/README.md), the reference weights de-quantized by those
  tools' own functions;
- int8 / int4 quantization at load of float models, the reference being the weights the engine holds.
Bad schemes are refused by name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from loraserve import LLM
from loraserve.layers.linear import Linear
from loraserve.layers.moe import FusedExperts
from loraserve.layers.quantized import QuantizedMatmul
from test_lora_fidelity import BASE, Case, assert_matches_peft, serve
from tiny_models import make_sharp_tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "quantized"
CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
CASES = {
    "r8-qv": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "r16-all-linear": Case(dict(r=16, lora_alpha=32, target_modules="all-linear")),
    "subset": Case(dict(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj", "down_proj"])),
}
ENGINE = dict(max_model_len=128, num_kv_blocks=160, block_size=4, max_lora_rank=16)


def test_fixtures_cover_every_checkpoint_scheme():
    methods = {json.loads((FIXTURES / c / "config.json").read_text())["quantization_config"]["quant_method"]
               for c in CHECKPOINTS}
    assert methods == {"gptq", "awq", "compressed-tensors"}


# a routed expert's module in a per-expert checkpoint (Mixtral's under block_sparse_moe, renamed to mlp)
EXPERT_MODULE = re.compile(r"(?P<experts>.+\.experts)\.(?P<e>\d+)\."
                           r"(?P<part>w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
GATE, UP = ("w1", "gate_proj"), ("w3", "up_proj")


def tool_dequantized(folder: Path):
    """transformers' model with the linears (and experts) the format's own tool de-quantized and the
    checkpoint's other tensors; per-expert modules stacked into transformers' fused expert tensors."""
    def build(llm: LLM):
        config = AutoConfig.from_pretrained(folder)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        tensors = load_file(folder / "model.safetensors") | load_file(folder / "reference.safetensors")
        tensors = {k.replace(".block_sparse_moe.", ".mlp."): v.float() for k, v in tensors.items()}
        state = {k: v for k, v in tensors.items() if k in model.state_dict()}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, tensor in tensors.items():
            if (m := EXPERT_MODULE.fullmatch(name)) is not None:
                experts.setdefault(m["experts"], {}).setdefault(int(m["e"]), {})[m["part"]] = tensor
        for path, by_expert in experts.items():
            parts = [by_expert[e] for e in sorted(by_expert)]
            pick = lambda p, names: next(p[n] for n in names if n in p)  # noqa: E731
            state[f"{path}.gate_up_proj"] = torch.stack([torch.cat([pick(p, GATE), pick(p, UP)]) for p in parts])
            state[f"{path}.down_proj"] = torch.stack([pick(p, ("w2", "down_proj")) for p in parts])
        model.load_state_dict(state, strict=True)
        return model
    return build


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint_served(request, tmp_path_factory):
    folder = FIXTURES / request.param
    arch = json.loads((folder / "config.json").read_text())["model_type"]
    moe = arch in ("mixtral", "qwen2_moe", "qwen3_moe")
    return serve(folder, CASES, tmp_path_factory.mktemp(request.param), reference=tool_dequantized(folder),
                 arch=arch if moe else None, **(ENGINE | dict(max_lora_rank=32) if moe else ENGINE))


@pytest.mark.parametrize("row", [BASE, *CASES])
def test_quantized_checkpoints_match_peft(checkpoint_served, row):
    assert_matches_peft(checkpoint_served, row)


def served_state(llm: LLM) -> dict[str, torch.Tensor]:
    """What the engine holds quantized, de-quantized (float32), under transformers' names: linear parts, fused
    [experts, out, in] expert stacks, a quantized embedding table / LM head."""
    state = {name: table.dequantize() for name, table in llm.engine.model.quantized.items()}
    dequantized = lambda matmul: torch.cat([w.dequantize() for w in matmul.weights])  # noqa: E731
    for name, module in llm.engine.model.named_modules():
        if isinstance(module, Linear) and isinstance(module.matmul, QuantizedMatmul):
            weight, parent = dequantized(module.matmul), name.rsplit(".", 1)[0]
            state.update({f"{parent}.{part}.weight": weight[module.part_slice(part)] for part in module.parts})
        elif isinstance(module, FusedExperts):
            state.update({f"{name}.{tensor}": torch.stack([dequantized(m) for m in matmuls])
                          for tensor, matmuls in module.matmuls.items()})
    return state


def engine_dequantized(path: Path):
    """transformers' model of `path` with every linear replaced by what the engine holds, de-quantized."""
    def build(llm: LLM):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for module in llm.engine.model.modules():
            if isinstance(module, Linear):
                assert isinstance(module.matmul, QuantizedMatmul)
            elif isinstance(module, FusedExperts):
                assert module.matmuls and not module.gate_up_proj.numel()
        state = served_state(llm)
        missing = set(state) - set(model.state_dict())
        assert not missing, missing
        original = {k: model.state_dict()[k].clone() for k in state}
        model.load_state_dict(state, strict=False)
        for name, weight in state.items():  # quantized, so not the original, but near it
            error = (weight - original[name]).abs().max() / original[name].abs().max()
            assert 0 < error < (0.01 if llm.engine.quantization == "int8" else 0.15), (name, error)
        return model
    return build


@pytest.fixture(scope="module", params=[("llama", "int8"), ("llama", "int4"), ("qwen2", "int4"), ("phi3", "int4"),
                                        ("mixtral", "int4"), ("qwen2_moe", "int8")], ids="-".join)
def on_the_fly_served(request, tmp_path_factory):
    arch, method = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-{method}")
    path = make_sharp_tiny_model(arch, folder / "model")
    # the MoE models' all-linear adapter reaches rank 32 (test_lora_fidelity serves them at 64)
    engine = ENGINE | dict(max_lora_rank=32) if "moe" in arch or arch == "mixtral" else ENGINE
    return serve(path, CASES, folder, reference=engine_dequantized(path), arch=arch, quantization=method, **engine)


@pytest.mark.parametrize("row", [BASE, *CASES])
def test_quantized_at_load_matches_peft(on_the_fly_served, row):
    assert_matches_peft(on_the_fly_served, row)


def _edited(folder: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("fixture, changes, requested, message", [
    ("gptq-4bit-g32-sym", dict(bits=3), None, "GPTQ with bits=3 is not supported; .* bits 4 or 8"),
    ("gptq-4bit-g32-sym", dict(checkpoint_format="marlin"), None, "checkpoint_format 'marlin' is not supported"),
    ("gptq-4bit-g32-sym", dict(quant_method="bitsandbytes"), None,
     "quantized with 'bitsandbytes', which loraserve does not serve; supported checkpoint schemes: gptq, awq"),
    ("awq-4bit-g32", dict(version="gemv"), None, "AWQ version 'gemv' is not supported"),
    ("gptq-4bit-g32-sym", {}, "int4", "is a gptq checkpoint; quantization='int4' cannot apply"),
    ("ct-w4a16-g32-sym", dict(format="float-quantized"), None, "format 'float-quantized' .* is not supported"),
], ids=["gptq-3bit", "gptq-format", "bitsandbytes", "awq-gemv", "mismatch", "ct-fp8"])
def test_unsupported_schemes_are_refused_by_name(fixture, changes, requested, message, tmp_path):
    folder = _edited(FIXTURES / fixture, tmp_path, **changes)
    if fixture.startswith("ct") and "format" in changes:  # the format may sit in each config group too
        config = json.loads((folder / "config.json").read_text())
        for group in config["quantization_config"]["config_groups"].values():
            group.pop("format", None)
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), quantization=requested, dtype="float32", **ENGINE)


def test_activation_quantization_is_refused(tmp_path):
    folder = _edited(FIXTURES / "ct-w4a16-g32-sym", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantizes activations; loraserve serves weight-only schemes"):
        LLM(str(folder), dtype="float32", **ENGINE)


def test_checkpoint_scheme_asked_of_a_float_model_is_refused(tmp_path):
    path = make_sharp_tiny_model("llama", tmp_path / "model")
    with pytest.raises(ValueError, match="has no quantization_config: it is not a gptq checkpoint"):
        LLM(str(path), quantization="gptq", dtype="float32", **ENGINE)
    with pytest.raises(ValueError, match=r"quantization='gguf' needs a \.gguf file"):
        LLM(str(path), quantization="gguf", dtype="float32", **ENGINE)
    with pytest.raises(ValueError, match="quantization must be one of gptq, awq, compressed-tensors, gguf, int8"):
        LLM(str(path), quantization="fp8", dtype="float32", **ENGINE)


def test_quantized_memory_is_real():
    """The engine reports the bytes it holds: the packed int4 linears, not a de-quantized copy."""
    folder = FIXTURES / "gptq-4bit-g32-sym"
    llm = LLM(str(folder), dtype="bfloat16", **ENGINE)
    packed = sum(v.numel() * v.element_size() for k, v in load_file(folder / "model.safetensors").items()
                 if k.rsplit(".", 1)[-1] in ("qweight", "scales", "qzeros"))
    linears = sum(m.nbytes for m in llm.engine.model.modules() if isinstance(m, Linear))
    dense_bf16 = sum(v.numel() * 2 for v in load_file(folder / "reference.safetensors").values())
    # int4 codes as packed; a float16 offset per group where the file has a packed 4-bit zero
    assert linears <= 1.1 * packed and linears < 0.32 * dense_bf16
