"""Merging an adapter into the base gives the same weights PEFT's merge_and_unload gives, and the engine
serving the merged folder reproduces the engine serving the adapter."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.lora.merge import merge_adapter
from tiny_models import make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_merged_weights_equal_peft_merge(tmp_path, arch):
    base_dir = make_tiny_model(arch, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", seed=3, r=8, lora_alpha=32, target_modules="all-linear")
    merged_dir = merge_adapter(str(base_dir), str(adapter_dir), tmp_path / "merged")

    reference = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    merged = load_file(merged_dir / "model.safetensors")
    original = load_file(base_dir / "model.safetensors")
    assert set(merged) == set(original)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-5)
    changed = {name for name in merged if not torch.equal(merged[name], original[name])}
    assert changed == {name for name in original if name.endswith("_proj.weight")}  # all-linear: every one moved


def test_engine_on_merged_folder_matches_adapter(tmp_path):
    base_dir = make_tiny_model("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", seed=4, r=8, lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "down_proj"])
    merged_dir = merge_adapter(str(base_dir), str(adapter_dir), tmp_path / "merged")
    settings = dict(dtype="float32", max_model_len=64, num_kv_blocks=32, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [40, 41]}]
    with_adapter = LLM(str(base_dir), enable_lora=True, **settings).generate(
        prompts, params, lora_request=LoRARequest("a", 1, str(adapter_dir)), use_tqdm=False)
    merged = LLM(str(merged_dir), **settings).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in merged] == [o.outputs[0].token_ids for o in with_adapter]


def test_merge_refuses_non_empty_output(tmp_path):
    base_dir = make_tiny_model("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(str(base_dir), str(adapter_dir), base_dir)
