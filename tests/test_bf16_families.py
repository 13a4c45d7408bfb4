"""bf16, the dtype users get on this CPU, on every family: the engine's top-5 logprobs of each generated
position against transformers (+ PEFT) in fp32, teacher-forced on the engine's own tokens, base and with an
all-linear adapter, with the CPU kernels and with every kernel off. The bound is transformers' own bf16 run on
the same weights and the same entries, measured in the same test: the engine may drift from fp32 about as much
as transformers does in bf16, not more. Sharp tiny models (tests/tiny_models.py), so the logits are far from
uniform and positions matter."""
from __future__ import annotations

import statistics

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.layers import cpu_kernels
from tiny_models import ARCHITECTURES, make_sharp_tiny_model

PROMPTS = ["Hello world, this is", "The quick brown fox jumps", "0123456789 counting: 10 11"]
PARAMS = SamplingParams(temperature=0, max_tokens=16, logprobs=5, ignore_eos=True)
# The engine's (mean, p90, max) |logprob difference| from fp32 may exceed transformers' bf16 one by this factor
# plus this slack: rounding in another order differs entry by entry, not in size.
FACTOR, SLACK = 1.5, (0.01, 0.02, 0.15)


def summary(diffs: list[float]) -> tuple[float, float, float]:
    diffs = sorted(diffs)
    return statistics.mean(diffs), diffs[int(len(diffs) * 0.9)], diffs[-1]


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bf16_drifts_no_more_than_transformers_bf16(arch, with_adapter, tmp_path, monkeypatch):
    path = make_sharp_tiny_model(arch, tmp_path / "model")
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    lora = None
    if with_adapter:
        adapter = make_peft_adapter(fp32, tmp_path / "adapter", seed=5, r=8, lora_alpha=16, target_modules="all-linear")
        lora = LoRARequest("a", 1, str(adapter))
        fp32 = PeftModel.from_pretrained(fp32, str(adapter)).eval()
        bf16 = PeftModel.from_pretrained(bf16, str(adapter)).eval()
    llm = LLM(str(path), dtype="bfloat16", max_model_len=128, num_kv_blocks=64, block_size=4,
              enable_lora=with_adapter, max_lora_rank=16)

    def drifts() -> tuple[list[float], list[float]]:
        """The engine's drift from fp32 and transformers' bf16 drift, on the same (position, token) entries."""
        ours, theirs = [], []
        for out in llm.generate(PROMPTS, PARAMS, use_tqdm=False, lora_request=lora):
            tokens, start = out.prompt_token_ids + out.outputs[0].token_ids, len(out.prompt_token_ids) - 1
            with torch.no_grad():
                exact, rounded = (torch.log_softmax(m(torch.tensor([tokens])).logits[0, start:-1].float(), -1)
                                  for m in (fp32, bf16))
            for position, top in enumerate(out.outputs[0].logprobs):
                for token, logprob in top.items():
                    ours.append(abs(logprob.logprob - exact[position, token].item()))
                    theirs.append(abs(rounded[position, token].item() - exact[position, token].item()))
        return ours, theirs

    kernels, bound = drifts()
    monkeypatch.setattr(cpu_kernels, "_module", lambda stem: None)  # every kernel off: the PyTorch path
    plain, _ = drifts()
    limit = summary(bound)
    for label, diffs in (("kernels", kernels), ("pytorch", plain)):
        got = summary(diffs)
        print(f"{arch} {'adapter' if with_adapter else 'base'} {label}: mean/p90/max {got[0]:.3f}/{got[1]:.3f}/"
              f"{got[2]:.3f}; transformers bf16 {limit[0]:.3f}/{limit[1]:.3f}/{limit[2]:.3f}")
        for name, value, reference, slack in zip(("mean", "p90", "max"), got, limit, SLACK, strict=True):
            assert value <= FACTOR * reference + slack, (label, name, value, reference)
