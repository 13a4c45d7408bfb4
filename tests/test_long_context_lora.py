"""Long-context LoRA (--long-lora-scaling-factors, vLLM's rule): an adapter whose adapter_config.json says it
was trained for a context_length beyond the model's max_position_embeddings has its tokens rotated with
linear RoPE scaled by ceil(context_length / max_position_embeddings), while the base and other adapters in the
same batch keep the model's own rotation.

Reference: transformers with the linear-scaled config + PEFT for the long adapter (prompts longer than the
model's context), the plain config for the rest; greedy tokens for 24 steps and full logits within 1e-4 (fp32)
on a Llama, Phi-3's packed layers, Mixtral's experts and the default model (its config's context lowered).
A factor the engine was not started with is refused naming the flag; a base request may not pass the
model's own context; KV computed under the long adapter is never reused by the base.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.errors import LoRAError, ParamError
from test_lora_fidelity import STEPS, TOLERANCE, engine_logits, peft_reference
from tiny_models import make_sharp_tiny_model

CONTEXT = 48  # the tiny models' max_position_embeddings here
TRAINED_FOR = 150  # the long adapter's context_length: factor ceil(150 / 48) = 4
FACTORS = "2,4"
FAMILIES = {"llama": {}, "phi3": {"original_max_position_embeddings": CONTEXT}, "mixtral": {}, "default": {}}


def _default_model_with_short_context(default_model_path: Path, folder: Path) -> Path:
    """The default model's own weights and tokenizer, its config saying a context of CONTEXT tokens (so a
    long-context adapter's prompts pass it at a size the test can afford)."""
    folder.mkdir()
    for item in default_model_path.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((default_model_path / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    return folder


def _adapter(hf, folder, seed, context_length=None):
    # the default model's 30 layers take milder scalings (as in test_lora_fidelity): random factors at scaling 2
    # move its logits by tens, which amplifies fp32 rounding past TOLERANCE
    alpha = 2 if "default" in folder.name else 16
    path = make_peft_adapter(hf, folder, seed=seed, r=8, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj"]
                             if "mixtral" in folder.name else "all-linear")
    if context_length is not None:
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config | {"context_length": context_length}))
    return path


@dataclass
class Family:
    arch: str
    hf: torch.nn.Module  # transformers on the model's own config
    scaled: torch.nn.Module  # on the linear-scaled config
    llm: LLM
    long_lora: LoRARequest
    plain_lora: LoRARequest


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, default_model_path):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"long-{arch}")
    if arch == "default":
        path = _default_model_with_short_context(default_model_path, folder / "model")
    else:
        path = make_sharp_tiny_model(arch, folder / "model", max_position_embeddings=CONTEXT, **FAMILIES[arch])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(path)
    factor = math.ceil(TRAINED_FOR / CONTEXT)
    config.rope_parameters = {"rope_type": "linear", "factor": float(factor),
                              "rope_theta": config.rope_parameters["rope_theta"]}
    scaled = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    long_lora = LoRARequest("long", 1, str(_adapter(hf, folder / f"{arch}-long", 1, TRAINED_FOR)))
    plain_lora = LoRARequest("plain", 2, str(_adapter(hf, folder / f"{arch}-plain", 2)))
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=4 * CONTEXT,
              num_kv_blocks=200, block_size=4, long_lora_scaling_factors=FACTORS)
    return Family(arch, hf, scaled, llm, long_lora, plain_lora)


def test_long_adapter_beside_base_and_plain_matches_linear_scaled_peft(family: Family):
    hf, scaled, llm, long_lora, plain_lora = family.hf, family.scaled, family.llm, family.long_lora, family.plain_lora
    tokenizer = llm.get_tokenizer()
    long_prompt = tokenizer.encode("A long document: " + " ".join(f"item {i};" for i in range(20)))[:110]
    short_prompt = tokenizer.encode("A short one")
    assert len(long_prompt) > CONTEXT >= len(short_prompt) + STEPS
    eos = llm.engine.eos_token_ids
    references = {
        "long": peft_reference(PeftModel.from_pretrained(copy.deepcopy(scaled), long_lora.lora_path).eval(),
                               long_prompt, eos),
        "plain": peft_reference(PeftModel.from_pretrained(copy.deepcopy(hf), plain_lora.lora_path).eval(),
                                short_prompt, eos),
        "base": peft_reference(hf, short_prompt, eos),
    }
    prompts = {"long": long_prompt, "plain": short_prompt, "base": short_prompt}
    loras = {"long": long_lora, "plain": plain_lora}
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts.values()], params, use_tqdm=False,
                           lora_request=[loras.get(row) for row in prompts])
    for row, out in zip(prompts, outputs, strict=True):
        assert list(out.outputs[0].token_ids) == references[row].tokens, row
    logits = engine_logits(llm, {row: prompts[row] + references[row].tokens for row in prompts}, loras)
    for row in prompts:
        assert (logits[row] - references[row].logits).abs().max().item() < TOLERANCE, row
    # not vacuous: the model's own rotation gives other logits for the long adapter's prompt
    with torch.no_grad():
        unscaled = PeftModel.from_pretrained(copy.deepcopy(hf), long_lora.lora_path).eval()
        ids = torch.tensor([prompts["long"] + references["long"].tokens])
        assert (unscaled(input_ids=ids).logits[0] - references["long"].logits).abs().max() > 1000 * TOLERANCE


def test_limits_and_prefix_isolation(family: Family, tmp_path):
    llm, long_lora = family.llm, family.long_lora
    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = list(range(5, 5 + CONTEXT + 8))
    with pytest.raises(ParamError, match=rf"the prompt has {len(prompt)} tokens but this model's maximum context "
                                         rf"length is {CONTEXT}"):
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    needs_eight = LoRARequest("eight", 3, str(_adapter(family.hf, tmp_path / f"{family.arch}-eight", 3, 8 * CONTEXT)))
    with pytest.raises(LoRAError, match=r"needs RoPE scaled by 8; this engine serves factors: 2, 4; restart with "
                                        r"--long-lora-scaling-factors 8"):
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False, lora_request=needs_eight)
    shared = list(range(5, 5 + 4 * 8))  # whole blocks, within the model's own context
    llm.generate([{"prompt_token_ids": shared + [1]}], params, use_tqdm=False, lora_request=long_lora)
    before = llm.engine.blocks.hit_tokens
    llm.generate([{"prompt_token_ids": shared + [2]}], params, use_tqdm=False)
    assert llm.engine.blocks.hit_tokens == before  # the base never reads KV rotated for the long adapter
    llm.generate([{"prompt_token_ids": shared + [3]}], params, use_tqdm=False, lora_request=long_lora)
    assert llm.engine.blocks.hit_tokens > before  # while the long adapter itself does


def test_learned_positions_refuse_long_context_lora(tmp_path):
    path = make_sharp_tiny_model("gpt_bigcode", tmp_path / "model")
    with pytest.raises(ValueError, match="GPT-BigCode has learned absolute positions, no RoPE to scale"):
        LLM(str(path), dtype="float32", enable_lora=True, long_lora_scaling_factors="4", max_model_len=64,
            num_kv_blocks=32)
