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
from tiny_models import make_sharp_tiny_model


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_merged_weights_equal_peft_merge(tmp_path, arch):
    base_dir = make_sharp_tiny_model(arch, tmp_path / "base")
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
    base_dir = make_sharp_tiny_model("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", seed=4, r=8, lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "down_proj"])
    merged_dir = merge_adapter(str(base_dir), str(adapter_dir), tmp_path / "merged")
    assert_serves_alike(merged_dir, base_dir, adapter_dir)


def assert_serves_alike(merged_dir, base_dir, adapter_dir) -> None:
    """The merged folder alone gives the greedy tokens, and the logprobs, the base gives with the adapter;
    and the adapter changes what the base says, or the equality would prove nothing."""
    settings = dict(dtype="float32", max_model_len=64, num_kv_blocks=32, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [40, 41]}]
    served = LLM(str(base_dir), enable_lora=True, **settings)
    base = served.generate(prompts, params, use_tqdm=False)
    with_adapter = served.generate(prompts, params, lora_request=LoRARequest("a", 1, str(adapter_dir)), use_tqdm=False)
    merged = LLM(str(merged_dir), **settings).generate(prompts, params, use_tqdm=False)
    for b, a, m in zip(base, with_adapter, merged, strict=True):
        base_ids, ids = b.outputs[0].token_ids, a.outputs[0].token_ids
        assert len(set(ids)) > 2  # varied text, not one token echoed
        assert ids != base_ids  # the adapter is in effect
        assert m.outputs[0].token_ids == ids
        chosen = [entry[t].logprob for t, entry in zip(ids, a.outputs[0].logprobs, strict=True)]
        assert [entry[t].logprob for t, entry in zip(ids, m.outputs[0].logprobs, strict=True)] == pytest.approx(
            chosen, abs=1e-3)


def test_merge_refuses_non_empty_output(tmp_path):
    base_dir = make_sharp_tiny_model("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(str(base_dir), str(adapter_dir), base_dir)


def test_merge_refuses_a_quantized_base_unless_asked_to_dequantize(tmp_path):
    """GPTQ weights cannot take an adapter without re-quantizing it away; --dequantize writes a float model
    that serves exactly what the quantized base plus the adapter serves."""
    from test_quantized_models import FIXTURES

    base_dir = FIXTURES / "gptq-4bit-g32-asym-actorder"
    adapter_dir = make_peft_adapter(_tiny_llama_like(base_dir), tmp_path / "adapter", seed=5, r=8, lora_alpha=16,
                                    target_modules="all-linear")
    with pytest.raises(ValueError, match=r"is a gptq checkpoint: a LoRA adapter cannot be merged .* --dequantize"):
        merge_adapter(str(base_dir), str(adapter_dir), tmp_path / "refused")
    merged_dir = merge_adapter(str(base_dir), str(adapter_dir), tmp_path / "merged", dequantize=True)
    assert "quantization_config" not in (merged_dir / "config.json").read_text()
    assert_serves_alike(merged_dir, base_dir, adapter_dir)


def _tiny_llama_like(folder):
    """A float model of the fixture's shape, for PEFT to write an adapter against."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
