"""The load report of an adapter (kinds, ranks, scalings, targets per layer, whole copies, added tokens,
long-context factor, bytes, identity): offline from a live engine and from `loraserve inspect` without one,
checked against what PEFT wrote into the adapter's files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest
from tiny_models import make_sharp_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    path = make_sharp_tiny_model("qwen2", folder / "model")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64,
              num_kv_blocks=32, block_size=4)
    return path, hf, llm, folder


def test_report_describes_what_the_files_hold(setup):
    _, hf, llm, folder = setup
    adapter = make_peft_adapter(hf, folder / "mixed", r=8, lora_alpha=16, use_dora=True, layers_to_transform=[1],
                                target_modules=["q_proj", "v_proj", "lm_head"], rank_pattern={"v_proj": 4},
                                modules_to_save=["norm"])
    report = llm.lora_report(LoRARequest("mixed", 1, str(adapter)))
    assert report["kinds"] == ["lora", "lm_head lora", "dora", "modules_to_save"]
    assert report["rank_by_module"] == {"lm_head": [8], "self_attn.q_proj": [8], "self_attn.v_proj": [4]}
    assert report["scaling_by_module"] == {"lm_head": [2.0], "self_attn.q_proj": [2.0], "self_attn.v_proj": [4.0]}
    assert report["targets_by_layer"] == {"1": ["self_attn.q_proj", "self_attn.v_proj"], "outside layers": ["lm_head"]}
    tensors = load_file(adapter / "adapter_model.safetensors")
    # the norms saved whole; save_embedding_layers' copy of the head (lm_head.base_layer) equals the base's: dropped
    saved = sorted(k.removeprefix("base_model.model.") for k in tensors if "lora" not in k and "base_layer" not in k)
    assert report["saved_tensors"] == saved and report["modules_to_save"] == ["norm"]
    assert "model.norm.weight" in saved and any("lm_head.base_layer" in k for k in tensors)
    factors = sum(t.numel() for k, t in tensors.items() if "lora_A" in k or "lora_B" in k) * 4
    assert report["host_bytes"] >= factors + sum(tensors[f"base_model.model.{k}"].numel() * 4 for k in saved)
    assert report["max_rank"] == 8 and report["added_tokens"] == 0 and report["long_context_factor"] == 1.0
    assert len(report["content_hash"]) == 64 and report["path"] == str(adapter)


def test_inspect_without_a_server_and_its_refusals(setup, tmp_path):
    path, hf, llm, _ = setup
    adapter = make_peft_adapter(hf, tmp_path / "plain", r=8, lora_alpha=16, target_modules="all-linear")
    run = [sys.executable, "-m", "loraserve.cli", "inspect", str(adapter), "--model", str(path)]
    shown = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    offline = llm.lora_report(LoRARequest("plain", 2, str(adapter)))
    assert shown == offline | {"name": "plain", "lora_int_id": 1}
    refused = subprocess.run([*run, "--max-lora-rank", "4"], capture_output=True, text=True, check=False)
    assert refused.returncode != 0
    assert "LoRA rank 8 of adapter 'plain' exceeds max_lora_rank=4; restart with --max-lora-rank 8" in refused.stderr
    long = json.loads((adapter / "adapter_config.json").read_text()) | {"context_length": 4 * 512}
    (adapter / "adapter_config.json").write_text(json.dumps(long))
    refused = subprocess.run(run, capture_output=True, text=True, check=False)
    assert "restart with --long-lora-scaling-factors 4" in refused.stderr
    shown = json.loads(subprocess.run([*run, "--json", "--long-lora-scaling-factors", "4"], capture_output=True,
                                      text=True, check=True).stdout)
    assert shown["long_context_factor"] == 4.0 and "long context" in shown["kinds"]
