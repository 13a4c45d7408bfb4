"""Every LoRA-family adapter kind PEFT writes, served against transformers + PEFT running the same files (fp32):
DoRA (linear layers, the embedding and the LM head), LoRA on the embedding table and the LM head,
modules_to_save (embedding, LM head, norms), lora_B biases with trained base biases (bias='all'), and
trainable token rows. Each family whose layers differ (a tied Llama, Phi-3's packed q/k/v and gate/up, Mixtral's
routed experts, GPT-BigCode's renamed modules and LayerNorm biases, Qwen2's q/k/v biases) and the default model
serve base + plain LoRA + every kind in one mixed batch, with fewer slots than adapters so adapters are evicted
and reloaded mid-run; each row is held to PEFT running that adapter alone (test_lora_fidelity's checks:
greedy tokens for 24 steps, step logprobs and full logits within 1e-4)."""
from __future__ import annotations

import pytest

from test_lora_fidelity import ATTENTION, BASE, MLP, Case, Served, assert_matches_peft, serve
from tiny_models import make_sharp_tiny_model

KINDS = {
    "r8-qv": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "dora": Case(dict(r=8, lora_alpha=16, use_dora=True, target_modules=ATTENTION + MLP)),
    "dora-vocab": Case(dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "lm_head", "o_proj"])),
    "embed-head": Case(dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "saved": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                       modules_to_save=["lm_head", "embed_tokens", "norm"])),
    "bias": Case(dict(r=8, lora_alpha=16, target_modules=ATTENTION, bias="all", lora_bias=True)),
    "tokens": Case(dict(r=8, lora_alpha=16, target_modules=["k_proj", "down_proj"],
                        trainable_token_indices="prompt")),
}
FAMILIES = ["llama", "phi3", "mixtral", "gpt_bigcode", "qwen2"]
SLOTS = 3  # fewer than the adapters of the batch: they take turns in the slots


def _cases(arch: str) -> dict[str, Case]:
    if arch != "mixtral":
        return KINDS
    # PEFT defines no DoRA on routed experts (target_parameters): Mixtral's DoRA adapts attention only
    return KINDS | {"dora": Case(dict(KINDS["dora"].lora, target_modules=ATTENTION))}


@pytest.fixture(scope="module", params=FAMILIES)
def kinds_served(request, tmp_path_factory) -> Served:
    folder = tmp_path_factory.mktemp(request.param)
    path = make_sharp_tiny_model(request.param, folder / "model")
    return serve(path, _cases(request.param), folder, arch=request.param, max_loras=SLOTS, max_model_len=128,
                 num_kv_blocks=160, block_size=4, max_lora_rank=8)


@pytest.mark.parametrize("row", [BASE, *KINDS])
def test_every_kind_matches_peft_in_one_mixed_batch(kinds_served: Served, row: str) -> None:
    assert_matches_peft(kinds_served, row)


@pytest.fixture(scope="module")
def default_kinds_served(default_model_path, tmp_path_factory) -> Served:
    """The default model (30 layers, tied 49k vocabulary) with milder scalings and DoRA magnitudes, as in
    test_lora_fidelity: fp32 rounding through 30 randomly rescaled layers otherwise passes 1e-4."""
    cases = {name: Case(dict(case.lora, lora_alpha=case.lora["r"] / 4), noise=0.25) for name, case in KINDS.items()}
    return serve(default_model_path, cases, tmp_path_factory.mktemp("default-kinds"), max_loras=SLOTS,
                 max_model_len=256, num_kv_blocks=64, block_size=16, max_lora_rank=8)


@pytest.mark.parametrize("row", [BASE, *KINDS])
def test_every_kind_matches_peft_on_the_default_model(default_kinds_served: Served, row: str) -> None:
    assert_matches_peft(default_kinds_served, row)
