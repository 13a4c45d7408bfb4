"""The engine serving PEFT adapters against transformers + PEFT running the same weights and files (fp32).

Every tiny architecture and the default model serve all their adapters (and the bare base) from one engine
in one mixed batch, then each row is compared with PEFT running that adapter alone:
- greedy tokens identical for STEPS steps (min_tokens / min_new_tokens keep both from stopping early);
- logprobs of every decode step within TOLERANCE (the engine's own sampler output, so the paged decode path
  with per-token adapter segments is what is checked);
- raw logits over the whole vocabulary at every position within TOLERANCE, from one mixed-adapter forward
  of prompt + reference tokens through the model runner's batch (`model(batch)`): logprobs alone would hide
  an error that shifts all logits of a row by the same amount, and only cover the top tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.engine.scheduler import ScheduledSeq
from loraserve.engine.sequence import Sequence
from tiny_models import ARCHITECTURES, make_tiny_model

STEPS = 24
TOLERANCE = 1e-4
PROMPT = "LoRA adapters share one base"
BASE = "base"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Phi-3 checkpoints store q/k/v and gate/up packed; PEFT adapts the packed modules there.
PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


@dataclass(frozen=True)
class Case:
    """One adapter: LoraConfig arguments written with unpacked module names."""

    lora: dict
    safe_serialization: bool = True


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
    "bin": Case(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                safe_serialization=False),
}
DEFAULT_MODEL = "default"
DEFAULT_MODEL_CASES = ["r16-all-linear", "subset"]  # 30 layers, 49k vocab: few cases keep the suite fast
MODELS = {**{arch: list(CASES) for arch in ARCHITECTURES}, DEFAULT_MODEL: DEFAULT_MODEL_CASES}
ROWS = [pytest.param(model, row, id=f"{model}-{row}") for model, cases in MODELS.items() for row in [BASE, *cases]]


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


def lora_kwargs(case: Case, packed: bool) -> dict:
    if not packed:
        return case.lora
    kwargs = dict(case.lora)
    if isinstance(kwargs["target_modules"], list):
        kwargs["target_modules"] = list(dict.fromkeys(PACKED.get(m, m) for m in kwargs["target_modules"]))
    for key in ("rank_pattern", "alpha_pattern"):
        if key in kwargs:
            kwargs[key] = {PACKED.get(k, k): v for k, v in kwargs[key].items()}
    return kwargs


def peft_reference(model, prompt_ids: list[int], eos_token_ids: list[int]) -> Reference:
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=STEPS, min_new_tokens=STEPS, eos_token_id=eos_token_ids,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        sequence = out.sequences[0]
        logits = model(input_ids=sequence[None]).logits[0].float()
    step_logprobs = torch.stack([step[0].float() for step in out.logits]).log_softmax(dim=-1)
    return Reference(sequence[len(prompt_ids):].tolist(), step_logprobs, logits)


def engine_logits(llm: LLM, token_ids: dict[str, list[int]], loras: dict[str, LoRARequest]) -> dict[str, torch.Tensor]:
    """Logits at every position of each row, all rows in one mixed-adapter forward of the model runner."""
    engine = llm.engine
    slots, failed = engine.lora_manager.activate(loras.values())
    assert not failed
    scheduled = []
    for i, (row, ids) in enumerate(token_ids.items()):
        seq = Sequence(-1 - i, row, 0, len(ids), list(ids), SamplingParams(), loras.get(row))
        engine.blocks.allocate(seq, len(ids))
        scheduled.append(ScheduledSeq(seq, len(ids)))
    try:
        batch, order = engine.runner.build_batch(scheduled, slots)
        batch.logits_indices = torch.arange(len(batch.input_ids))
        logits = engine.model(batch)
    finally:
        for s in scheduled:
            engine.blocks.free(s.seq)
    spans = batch.attention.prefills
    return {s.seq.request_id: logits[span.start:span.end] for s, span in zip(order, spans)}


@pytest.fixture(scope="module")
def served(request, tmp_path_factory) -> Served:
    model_name = request.param
    cases = MODELS[model_name]
    if model_name == DEFAULT_MODEL:
        path = request.getfixturevalue("default_model_path")
        llm = LLM(str(path), dtype="float32", max_model_len=256, num_kv_blocks=48, block_size=16,
                  enable_lora=True, max_loras=len(cases), max_lora_rank=16)
    else:
        path = make_tiny_model(model_name, tmp_path_factory.mktemp(model_name) / "model")
        llm = LLM(str(path), dtype="float32", max_model_len=128, num_kv_blocks=160, block_size=4,
                  enable_lora=True, max_loras=len(cases), max_lora_rank=64)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    packed = any(name.endswith("qkv_proj") for name, _ in hf.named_modules())
    eos = llm.engine.eos_token_ids
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    references = {BASE: peft_reference(hf, prompt_ids, eos)}  # before PEFT wraps (and changes) hf

    adapters_dir = tmp_path_factory.mktemp(f"{model_name}-adapters")
    loras, peft_model = {}, None
    for lora_id, name in enumerate(cases, start=1):
        case = CASES[name]
        folder = make_peft_adapter(hf, adapters_dir / name, seed=lora_id,
                                   safe_serialization=case.safe_serialization, **lora_kwargs(case, packed))
        loras[name] = LoRARequest(name, lora_id, str(folder))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(hf, str(folder), adapter_name=name).eval()
        else:
            peft_model.load_adapter(str(folder), adapter_name=name)
    for name in cases:
        peft_model.set_adapter(name)
        references[name] = peft_reference(peft_model, prompt_ids, eos)

    rows = [BASE, *cases]
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=STEPS, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": prompt_ids}] * len(rows), params, use_tqdm=False,
                           lora_request=[loras.get(row) for row in rows])
    completions = {row: out.outputs[0] for row, out in zip(rows, outputs)}
    full_ids = {row: prompt_ids + references[row].tokens for row in rows}
    return Served(
        engine_tokens={row: c.token_ids for row, c in completions.items()},
        engine_step_logprobs={row: c.logprobs for row, c in completions.items()},
        engine_logits=engine_logits(llm, full_ids, loras),
        references=references,
        prompt_len=len(prompt_ids),
    )


@pytest.mark.parametrize("served, row", ROWS, indirect=["served"])
def test_greedy_tokens_match_peft(served: Served, row: str) -> None:
    assert served.engine_tokens[row] == served.references[row].tokens


@pytest.mark.parametrize("served, row", ROWS, indirect=["served"])
def test_decode_logprobs_match_peft(served: Served, row: str) -> None:
    reference = served.references[row].step_logprobs
    steps = served.engine_step_logprobs[row]
    assert len(steps) == STEPS
    for step, entries in enumerate(steps):
        for token_id, logprob in entries.items():
            assert abs(logprob.logprob - reference[step, token_id].item()) < TOLERANCE, (step, token_id)


@pytest.mark.parametrize("served, row", ROWS, indirect=["served"])
def test_logits_match_peft(served: Served, row: str) -> None:
    ours, reference = served.engine_logits[row], served.references[row].logits
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < TOLERANCE


ADAPTER_ROWS = [p for p in ROWS if p.values[1] != BASE]


@pytest.mark.parametrize("served, row", ADAPTER_ROWS, indirect=["served"])
def test_adapter_changes_the_logits(served: Served, row: str) -> None:
    """Guards the comparisons above against passing vacuously: on the shared prompt, every adapter must move
    the logits well beyond TOLERANCE away from the base model's."""
    prompt = slice(0, served.prompt_len)
    adapted, base = served.references[row].logits[prompt], served.references[BASE].logits[prompt]
    assert (adapted - base).abs().max().item() > 100 * TOLERANCE
