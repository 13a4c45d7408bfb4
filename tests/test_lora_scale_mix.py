"""Per-request adapter scale and weighted mixes, served in one mixed batch against independent references (fp32):
- `lora_scale=s` against transformers + PEFT with that adapter's every scaling multiplied by s, for s in
  {0, 0.5, 2} beside the same adapter at scale 1; s = 0 gives the base row's tokens and logprobs exactly;
- a two- and a three-adapter mix against the weighted deltas merged into a copy of the base weights
  (W₀ + Σ wᵢ·sᵢ·BᵢAᵢ, PEFT's merge of each adapter at its coefficient, one after the other), one of the mixed
  adapters itself at a lora_scale;
- DoRA, embedding / lm_head LoRA and lora_B biases beside trained base biases at scales too;
all in one batch with the base, plain and scaled requests and more adapters than slots, on a dense (Llama), a
packed (Phi-3: a mix's adapters target different parts of qkv) and a routed-expert (Mixtral) model. Checks as
test_lora_fidelity: greedy tokens for 24 steps, step logprobs and full logits within 1e-4."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter, scale_lora_layers
from loraserve import LLM, LoRAMix, LoRARequest, SamplingParams
from loraserve.errors import LoRAError
from test_lora_fidelity import (
    ATTENTION,
    BASE,
    MLP,
    PROMPT,
    STEPS,
    Case,
    Served,
    assert_matches_peft,
    engine_logits,
    lora_kwargs,
    teacher_forced_reference,
)
from tiny_models import make_sharp_tiny_model

ADAPTERS = {  # different ranks, alphas and (on Phi-3's packed qkv) parts, one with rsLoRA
    "a": Case(dict(r=8, lora_alpha=8, use_rslora=True, target_modules=ATTENTION + MLP)),
    "b": Case(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "c": Case(dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"])),
    "d": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    # the other kinds under a scale: DoRA's norm at the scale, embedding / lm_head LoRA, lora_B biases scaled
    # beside trained base biases (bias="all") that are not
    "dora": Case(dict(r=8, lora_alpha=16, use_dora=True, target_modules=ATTENTION)),
    "vocab": Case(dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "bias": Case(dict(r=8, lora_alpha=16, target_modules=ATTENTION, bias="all", lora_bias=True)),
}
SLOTS = 3  # seven adapters take turns; the three-adapter mix needs all three slots in its steps


@dataclass(frozen=True)
class Row:
    """(adapter, weight, lora_scale) terms; one term of weight 1 outside a mix is a plain LoRARequest."""

    terms: tuple[tuple[str, float, float], ...]
    mix: bool = False


ROWS = {
    "a": Row((("a", 1.0, 1.0),)),
    "a@0.5": Row((("a", 1.0, 0.5),)),
    "a@2": Row((("a", 1.0, 2.0),)),
    "a@0": Row((("a", 1.0, 0.0),)),
    "d": Row((("d", 1.0, 1.0),)),
    "mix2": Row((("a", 0.7, 1.0), ("b", 0.3, 1.0)), mix=True),
    "mix3": Row((("b", 1.0, 0.5), ("a", 0.5, 1.0), ("c", 0.25, 1.0)), mix=True),
    "dora@0.5": Row((("dora", 1.0, 0.5),)),
    "dora@2": Row((("dora", 1.0, 2.0),)),
    "vocab@2": Row((("vocab", 1.0, 2.0),)),
    "bias@0.5": Row((("bias", 1.0, 0.5),)),
}
FAMILIES = ["llama", "phi3", "mixtral"]


def _reference_model(hf, folders: dict[str, str], row: Row):
    """PEFT unmerged at the row's scale for one adapter; for a mix each adapter merged into the base copy at
    weight × scale, so the model computes W₀ + Σ wᵢ·sᵢ·BᵢAᵢ."""
    if not row.mix:
        name, _, scale = row.terms[0]
        return scale_lora_layers(PeftModel.from_pretrained(copy.deepcopy(hf), folders[name]), scale).eval()
    model = copy.deepcopy(hf)
    for name, weight, scale in row.terms:
        model = scale_lora_layers(PeftModel.from_pretrained(model, folders[name]), weight * scale).merge_and_unload()
    return model.eval()


def _request(row: Row, requests: dict[str, LoRARequest]) -> LoRARequest | LoRAMix:
    def scaled(name: str, scale: float) -> LoRARequest:
        return LoRARequest(name, requests[name].lora_int_id, requests[name].lora_path, lora_scale=scale)

    if not row.mix:
        name, _, scale = row.terms[0]
        return scaled(name, scale)
    return LoRAMix([(scaled(name, scale), weight) for name, weight, scale in row.terms])


@pytest.fixture(scope="module", params=FAMILIES)
def scale_mix_served(request, tmp_path_factory) -> tuple[Served, dict]:
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    path = make_sharp_tiny_model(arch, folder / "model")
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=SLOTS, max_lora_rank=8, max_model_len=128,
              num_kv_blocks=160, block_size=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    folders, requests = {}, {}
    for lora_id, (name, case) in enumerate(ADAPTERS.items(), start=1):
        folders[name] = str(make_peft_adapter(hf, folder / name, seed=lora_id, **lora_kwargs(case, arch, prompt_ids)))
        requests[name] = LoRARequest(name, lora_id, folders[name])
    loras = {row: _request(spec, requests) for row, spec in ROWS.items()}
    rows = [BASE, *ROWS]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": prompt_ids}] * len(rows), params, use_tqdm=False,
                           lora_request=[loras.get(row) for row in rows])
    completions = {row: out.outputs[0] for row, out in zip(rows, outputs, strict=True)}
    stats = llm.engine.stats()
    eos = llm.engine.eos_token_ids
    references = {}
    for row in rows:
        model = hf if row == BASE else _reference_model(hf, folders, ROWS[row])
        references[row] = teacher_forced_reference(model, prompt_ids, list(completions[row].token_ids), eos)
    full_ids = {row: prompt_ids + references[row].tokens for row in rows}
    served = Served(engine_tokens={row: c.token_ids for row, c in completions.items()},
                    engine_step_logprobs={row: c.logprobs for row, c in completions.items()},
                    engine_logits=engine_logits(llm, full_ids, loras), references=references,
                    prompt_len=len(prompt_ids))
    return served, {"llm": llm, "hf": hf, "arch": arch, "requests": requests, "stats": stats}


@pytest.mark.parametrize("row", [BASE, *[row for row in ROWS if row != "a@0"]])
def test_scales_and_mixes_match_their_references_in_one_batch(scale_mix_served, row: str) -> None:
    assert_matches_peft(scale_mix_served[0], row)


def test_scale_zero_is_the_base_exactly_and_scales_share_one_slot(scale_mix_served) -> None:
    served, extra = scale_mix_served
    assert served.engine_tokens["a@0"] == served.engine_tokens[BASE]
    for ours, base in zip(served.engine_step_logprobs["a@0"], served.engine_step_logprobs[BASE], strict=True):
        assert {t: p.logprob for t, p in ours.items()} == {t: p.logprob for t, p in base.items()}
    # requests of "a" at four scales and in two mixes: one host copy (each adapter read once)
    assert extra["stats"].lora.host.loads == len(ADAPTERS)


def test_mix_refusals_name_what_is_wrong(scale_mix_served, tmp_path) -> None:
    """DoRA and modules_to_save adapters in a mix, a mix beyond the slots, and weights or scales that are no
    coefficients are refused by name, and the engine keeps serving."""
    extra = scale_mix_served[1]
    llm, requests = extra["llm"], extra["requests"]
    params = SamplingParams(max_tokens=2)
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    for lora_id, (name, kind, why) in enumerate([
            ("dora", dict(use_dora=True), "is a DoRA adapter"),
            ("saved", dict(modules_to_save=["lm_head"]), "replaces base tensors whole")], start=10):
        case = Case(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kind))
        folder = make_peft_adapter(extra["hf"], tmp_path / name, seed=lora_id,
                                   **lora_kwargs(case, extra["arch"], prompt_ids))
        mix = LoRAMix([(requests["a"], 0.5), (LoRARequest(name, lora_id, str(folder)), 0.5)])
        with pytest.raises(LoRAError, match=rf"adapter '{name}' cannot be part of a mix: it {why}"):
            llm.generate("x", params, lora_request=mix, use_tqdm=False)
    four = LoRAMix([(requests[name], 0.25) for name in "abcd"])
    with pytest.raises(LoRAError, match=r"a mix of 4 adapters needs that many slots at once but max_loras=3"):
        llm.generate("x", params, lora_request=four, use_tqdm=False)
    with pytest.raises(ValueError, match=r"weight of adapter 'a' must be a finite number in \[0, 1000\], got -1"):
        LoRAMix([(requests["a"], -1)])
    with pytest.raises(ValueError, match=r"LoRAMix names lora_int_id 1 twice"):
        LoRAMix([(requests["a"], 0.5), (requests["a"], 0.5)])
    with pytest.raises(ValueError, match=r"lora_scale of adapter 'a' must be a finite number in \[0, 1000\], got nan"):
        LoRARequest("a", 1, requests["a"].lora_path, lora_scale=float("nan"))
    ok = llm.generate("x", params, lora_request=LoRAMix([(requests["a"], 1.0)]), use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 2


def test_prefix_cache_is_shared_only_within_one_identity(scale_mix_served) -> None:
    """KV prefixes are keyed by the adapter identity: a repeat at the same scale or the same mix (in any order
    of its adapters) hits the cache; another scale of the same adapter, a mix of it alone, another weighting
    of the same adapters, or the base never reuse its KV (the hit counter stays put)."""
    extra = scale_mix_served[1]
    llm, requests = extra["llm"], extra["requests"]
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode("Prefix caching keys KV by adapter identity, " * 2)}

    def hits(lora) -> int:
        before = llm.engine.stats().prefix_hit_tokens
        llm.generate(prompt, SamplingParams(max_tokens=1), lora_request=lora, use_tqdm=False)
        return llm.engine.stats().prefix_hit_tokens - before

    def at(name: str, scale: float) -> LoRARequest:
        return LoRARequest(name, requests[name].lora_int_id, requests[name].lora_path, lora_scale=scale)

    ab = LoRAMix([(requests["a"], 0.7), (requests["b"], 0.3)])
    assert hits(at("a", 1.0)) == 0
    full = hits(at("a", 1.0))  # the prompt's full blocks
    assert full >= len(prompt["prompt_token_ids"]) - 8
    assert [hits(at("a", 0.5)), hits(at("a", 0.5))] == [0, full]
    assert hits(LoRAMix([(requests["a"], 0.5)])) == 0  # the same product, another identity
    assert hits(None) == 0
    assert [hits(ab), hits(LoRAMix([(requests["b"], 0.3), (requests["a"], 0.7)]))] == [0, full]
    assert hits(LoRAMix([(requests["a"], 0.3), (requests["b"], 0.7)])) == 0
