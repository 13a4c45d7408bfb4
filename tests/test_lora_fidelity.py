"""The engine serving PEFT adapters against transformers + PEFT running the same weights and files (fp32).

Every tiny architecture (sharpened, so its tokens vary with context and adapter) and the default model serve
all their adapters (and the bare base) from one engine in one mixed batch, then each row is compared with
PEFT running that adapter alone:
- greedy tokens identical for STEPS steps (min_tokens / min_new_tokens keep both from stopping early);
- logprobs of every decode step within TOLERANCE (the engine's own sampler output, so the paged decode path
  with all adapters' decode tokens batched together is what is checked);
- raw logits over the whole vocabulary at every position within TOLERANCE, from one mixed-adapter forward
  of prompt + reference tokens through the model runner's batch (`model(batch)`): logprobs alone would hide
  an error that shifts all logits of a row by the same amount, and only cover the top tokens.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRAMix, LoRARequest, SamplingParams
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.engine.sequence import Sequence
from loraserve.lora.applied import AppliedLoRA
from tiny_models import ARCHITECTURES, make_sharp_tiny_model

STEPS = 24
TOLERANCE = 1e-4
PROMPT = "LoRA adapters share one base"
BASE = "base"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# CASES name Llama's modules; each architecture's own names for them (several may be one packed module: PEFT
# adapts the module the checkpoint has). Keys are regex fragments, so rank/alpha pattern keys map too.
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}
GATE_UP = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
BIGCODE = {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "c_proj", "gate_proj": "c_fc",
           "up_proj": "c_fc", "down_proj": "c_proj", r"layers\.": r"h\.", "embed_tokens": "wte", "norm": "ln_f"}
MODULE_NAMES = {"phi3": PACKED, "glm": GATE_UP, "glm4": GATE_UP, "gpt_bigcode": BIGCODE, "gpt_bigcode_mha": BIGCODE}
# MoE models: the routed experts' gate/up/down are fused tensors, adapted through PEFT's target_parameters;
# Mixtral and Qwen3-MoE have no other MLP modules, Qwen2-MoE keeps a shared expert and a dense layer.
EXPERT_TENSORS = {"gate_proj": "experts.gate_up_proj", "up_proj": "experts.gate_up_proj",
                  "down_proj": "experts.down_proj"}
MOE = {"mixtral": False, "qwen3_moe": False, "qwen2_moe": True}  # arch -> keeps MLP target_modules


@dataclass(frozen=True)
class Case:
    """One adapter: LoraConfig arguments written with unpacked module names."""

    lora: dict
    safe_serialization: bool = True
    noise: float = 1.0  # how far DoRA magnitudes and saved tensors move off the base's (make_peft_adapter)


CASES = {
    "r8-qv": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "r16-all-linear": Case(dict(r=16, lora_alpha=32, target_modules="all-linear")),
    "r64": Case(dict(r=64, lora_alpha=128, target_modules=ATTENTION + MLP)),
    "rslora": Case(dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ATTENTION + MLP)),
    "patterns": Case(dict(r=8, lora_alpha=16, target_modules=ATTENTION + MLP,
                          rank_pattern={"o_proj": 4, r"layers\.1\.mlp\.down_proj": 12},
                          alpha_pattern={"v_proj": 40, "up_proj": 3})),
    "layers": Case(dict(r=8, lora_alpha=16, target_modules=ATTENTION + MLP, layers_to_transform=[1])),
    "subset": Case(dict(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj", "down_proj"])),
    # MLP only: on Mixtral / Qwen3-MoE nothing but the routed experts (target_parameters, no target_modules)
    "mlp-only": Case(dict(r=8, lora_alpha=16, target_modules=MLP)),
    "bin": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                safe_serialization=False),
}
# Few cases for the 30-layer default model, to keep the suite fast; and milder scalings: random factors at
# scaling 2 move its logits by up to 40, which amplifies fp32 rounding past TOLERANCE (the bare base already
# differs from transformers by 6e-5), while these still move them by several units.
DEFAULT_MODEL_CASES = {
    "r16-all-linear": Case(dict(r=16, lora_alpha=4, target_modules="all-linear")),
    "subset": Case(dict(r=8, lora_alpha=2, target_modules=["k_proj", "up_proj", "down_proj"])),
}


@dataclass
class Reference:
    tokens: list[int]
    step_logprobs: torch.Tensor  # [STEPS, vocab] log-softmax of the logits each token was picked from
    logits: torch.Tensor  # [prompt + STEPS, vocab] forward over prompt + tokens


@dataclass
class Served:
    engine_tokens: dict[str, list[int]]
    engine_step_logprobs: dict[str, list[dict]]  # per step: token id -> Logprob, as the engine reported
    engine_logits: dict[str, torch.Tensor]
    references: dict[str, Reference]
    prompt_len: int


def _rename(text: str, names: dict[str, str]) -> str:
    for old, new in names.items():
        text = re.sub(rf"(?<![a-z_]){old}", new, text)
    return text


def lora_kwargs(case: Case, arch: str | None, prompt_ids: list[int]) -> dict:
    """The case's LoraConfig arguments in `arch`'s module names (expert MLP names -> target_parameters);
    trainable_token_indices="prompt" trains the rows of three of the prompt's tokens."""
    kwargs = dict(case.lora)
    if kwargs.get("trainable_token_indices") == "prompt":
        kwargs["trainable_token_indices"] = sorted(set(prompt_ids))[:3]
    names = MODULE_NAMES.get(arch, {})
    targets = kwargs["target_modules"]
    if arch in MOE and isinstance(targets, list):
        kwargs["target_parameters"] = list(dict.fromkeys(EXPERT_TENSORS[m] for m in targets if m in EXPERT_TENSORS))
        targets = [m for m in targets if MOE[arch] or m not in EXPERT_TENSORS]
    if isinstance(targets, list):
        targets = list(dict.fromkeys(_rename(m, names) for m in targets))
    kwargs["target_modules"] = targets
    if "modules_to_save" in kwargs:
        kwargs["modules_to_save"] = [_rename(m, names) for m in kwargs["modules_to_save"]]
    for key in ("rank_pattern", "alpha_pattern"):
        if key in kwargs:
            patterns = {_rename(k, names): v for k, v in kwargs[key].items()}
            if arch in MOE:  # the same pattern for the expert tensor standing in for an MLP module
                patterns |= {_rename(k, {m: re.escape(t) for m, t in EXPERT_TENSORS.items()}): v
                             for k, v in kwargs[key].items() if any(m in k for m in EXPERT_TENSORS)}
            kwargs[key] = patterns
    return kwargs


def peft_reference(model, prompt_ids: list[int], eos_token_ids: list[int]) -> Reference:
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=STEPS, min_new_tokens=STEPS, eos_token_id=eos_token_ids,
                             pad_token_id=eos_token_ids[0], output_logits=True, return_dict_in_generate=True)
        sequence = out.sequences[0]
        logits = model(input_ids=sequence[None]).logits[0].float()
    step_logprobs = torch.stack([step[0].float() for step in out.logits]).log_softmax(dim=-1)
    return Reference(sequence[len(prompt_ids):].tolist(), step_logprobs, logits)


def teacher_forced_reference(model, prompt_ids: list[int], tokens: list[int], eos_token_ids: list[int]) -> Reference:
    """The reference's greedy choice and logits at every step of the engine's own generation, from one forward
    over prompt + tokens (what generate() computes step by step on the same prefix, without its loop): where
    the engine picked another token than the reference would, `tokens` differ from the engine's there. EOS
    is barred from the choice as min_tokens bars it from the engine's."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0].float()
    steps = logits[len(prompt_ids) - 1:-1]
    choices = steps.clone()
    choices[:, eos_token_ids] = float("-inf")
    return Reference(choices.argmax(dim=-1).tolist(), steps.log_softmax(dim=-1), logits)


def engine_logits(llm: LLM, token_ids: dict[str, list[int]],
                  loras: dict[str, LoRARequest | LoRAMix]) -> dict[str, torch.Tensor]:
    """Logits at every position of each row, the rows in mixed-adapter forwards of the model runner, as many
    adapters in each as there are slots (a mix counts each of its adapters)."""
    rows, per_forward = list(token_ids), llm.engine.config.lora.max_loras
    logits: dict[str, torch.Tensor] = {}
    while rows:
        group, adapters = [], set()
        while rows and len(adapters | _adapter_ids(loras.get(rows[0]))) <= per_forward:
            adapters |= _adapter_ids(loras.get(rows[0]))
            group.append(rows.pop(0))
        logits |= _one_forward(llm, {row: token_ids[row] for row in group},
                               {row: loras[row] for row in group if row in loras})
    return logits


def _adapter_ids(lora: LoRARequest | LoRAMix | None) -> set[int]:
    if lora is None:
        return set()
    return {r.lora_int_id for r, _ in lora.adapters} if isinstance(lora, LoRAMix) else {lora.lora_int_id}


def _one_forward(llm: LLM, token_ids: dict[str, list[int]],
                 loras: dict[str, LoRARequest | LoRAMix]) -> dict[str, torch.Tensor]:
    engine = llm.engine
    manager = engine.lora_manager
    applied = {}
    for row, lora in loras.items():
        if isinstance(lora, LoRAMix):
            applied[row] = AppliedLoRA.mixed([(manager.acquire(r), w, r.lora_scale) for r, w in lora.adapters])
        else:
            applied[row] = AppliedLoRA.single(manager.acquire(lora), lora.lora_scale)
    slots = manager.activate(adapter for a in applied.values() for adapter in a.adapters)
    scheduled = []
    for i, (row, ids) in enumerate(token_ids.items()):
        seq = Sequence(-1 - i, row, 0, len(ids), list(ids), SamplingParams(), lora=applied.get(row))
        engine.blocks.allocate(seq, len(ids))
        scheduled.append(ScheduledSeq(seq, len(ids)))
    try:
        batch, order = engine.runner.build_batch(scheduled, slots)
        batch.logits_indices = torch.arange(len(batch.input_ids))
        logits = engine.model(batch)
    finally:
        for s in scheduled:
            engine.blocks.free(s.seq)
        for a in applied.values():
            for adapter in a.adapters:
                manager.release(adapter)
    spans = batch.attention.prefills
    return {s.seq.request_id: logits[span.start:span.end] for s, span in zip(order, spans, strict=True)}


def serve(path: Path, cases: dict[str, Case], adapters_dir: Path,
          reference: Callable[[LLM], nn.Module] | None = None, arch: str | None = None,
          max_loras: int | None = None, **engine_kwargs) -> Served:
    """Serve base + every case from one engine in one mixed batch; PEFT runs each alone for reference, on
    transformers' load of `path` or on `reference(llm)` (e.g. a quantized model's de-quantized weights).
    With `max_loras` below the number of cases, adapters take turns in the slots (evictions mid-run)."""
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=max_loras or len(cases), **engine_kwargs)
    if reference is None:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        hf = reference(llm)
    eos = llm.engine.eos_token_ids
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    loras = {}
    for lora_id, (name, case) in enumerate(cases.items(), start=1):
        folder = make_peft_adapter(hf, adapters_dir / name, seed=lora_id,
                                   safe_serialization=case.safe_serialization, noise=case.noise,
                                   **lora_kwargs(case, arch, prompt_ids))
        loras[name] = LoRARequest(name, lora_id, str(folder))
    rows = [BASE, *cases]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": prompt_ids}] * len(rows), params, use_tqdm=False,
                           lora_request=[loras.get(row) for row in rows])
    completions = {row: out.outputs[0] for row, out in zip(rows, outputs, strict=True)}
    references = {}
    for row in rows:  # each adapter alone on its own copy: PEFT holds one set of target_parameters per model
        model = hf if row == BASE else PeftModel.from_pretrained(copy.deepcopy(hf), loras[row].lora_path).eval()
        references[row] = teacher_forced_reference(model, prompt_ids, list(completions[row].token_ids), eos)
    full_ids = {row: prompt_ids + references[row].tokens for row in rows}
    return Served(
        engine_tokens={row: c.token_ids for row, c in completions.items()},
        engine_step_logprobs={row: c.logprobs for row, c in completions.items()},
        engine_logits=engine_logits(llm, full_ids, loras),
        references=references,
        prompt_len=len(prompt_ids),
    )


def tolerance(served: Served) -> float:
    """TOLERANCE, or three times the bare base model's own largest logit deviation from transformers in the same
    run where that is more: fp32 rounding through a deep model depends on the CPU's matmul kernels (on a Xeon
    with AMX, the default model's bias kind reached 1.1e-4 while its bare base stayed under 1e-4)."""
    base = (served.engine_logits[BASE] - served.references[BASE].logits).abs().max().item()
    return max(TOLERANCE, 3 * base)


def assert_matches_peft(served: Served, row: str) -> None:
    reference = served.references[row]
    assert served.engine_tokens[row] == reference.tokens
    bound = tolerance(served)

    steps = served.engine_step_logprobs[row]
    assert len(steps) == STEPS
    for step, entries in enumerate(steps):
        for token_id, logprob in entries.items():
            assert abs(logprob.logprob - reference.step_logprobs[step, token_id].item()) < bound, (step, token_id)

    ours = served.engine_logits[row]
    assert ours.shape == reference.logits.shape
    assert (ours - reference.logits).abs().max().item() < bound

    if row != BASE:  # not vacuous: the adapter changes the generation, and on the shared prompt it moves the
        # logits far beyond TOLERANCE
        assert reference.tokens != served.references[BASE].tokens
        prompt = slice(0, served.prompt_len)
        moved = (reference.logits[prompt] - served.references[BASE].logits[prompt]).abs().max().item()
        assert moved > 1000 * TOLERANCE


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny_served(request, tmp_path_factory) -> Served:
    folder = tmp_path_factory.mktemp(request.param)
    path = make_sharp_tiny_model(request.param, folder / "model")
    return serve(path, CASES, folder, arch=request.param, max_model_len=128, num_kv_blocks=160, block_size=4,
                 max_lora_rank=64)


@pytest.fixture(scope="module")
def default_served(default_model_path, tmp_path_factory) -> Served:
    return serve(default_model_path, DEFAULT_MODEL_CASES, tmp_path_factory.mktemp("default"), max_model_len=256,
                 num_kv_blocks=48, block_size=16, max_lora_rank=16)


@pytest.mark.parametrize("row", [BASE, *CASES])
def test_tiny_architectures_match_peft(tiny_served: Served, row: str) -> None:
    assert_matches_peft(tiny_served, row)


@pytest.mark.parametrize("row", [BASE, *DEFAULT_MODEL_CASES])
def test_default_model_matches_peft(default_served: Served, row: str) -> None:
    assert_matches_peft(default_served, row)
