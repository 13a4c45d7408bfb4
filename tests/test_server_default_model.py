"""`loraserve serve` on the default model with the demo adapters (examples/adapters), as `make serve` runs it
(and with `--quantization gguf`): greedy chat answers through the server, for the base and both adapters in one
concurrent burst, equal the offline LLM.chat answers. The demo adapters are committed: a missing one fails."""
from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from loraserve import LLM, LoRARequest, SamplingParams
from server_utils import ServerProcess

ADAPTERS = Path(__file__).resolve().parent.parent / "examples" / "adapters"
NAMES = ["uppercase", "json"]
QUESTIONS = ["What is gravity?", "Name three primary colors."]
ENGINE = dict(dtype="float32", max_model_len=256, num_kv_blocks=128, block_size=16)


def assert_demo_adapters_present() -> None:
    """Committed with the repo, so a missing (or Git LFS pointer) file is a failure, not a reason to skip."""
    for name in NAMES:
        config, weights = ADAPTERS / name / "adapter_config.json", ADAPTERS / name / "adapter_model.safetensors"
        assert config.is_file() and weights.is_file(), f"demo adapter {name!r} missing under {ADAPTERS}"
        assert weights.stat().st_size > 100_000, f"{weights} holds no weights"


def test_demo_adapters_are_in_the_repo():
    assert_demo_adapters_present()


@pytest.mark.parametrize("quantization", [None, "gguf"], ids=["dense", "gguf-q4_1"])
def test_default_model_with_demo_adapters(default_model_path, tmp_path, quantization):
    """Dense: the converted folder; gguf: the shipped Q4_1 file kept quantized, LoRA on top."""
    assert_demo_adapters_present()
    model = str(default_model_path) if quantization is None else None
    llm = LLM(model, **ENGINE, enable_lora=True, max_loras=2, quantization=quantization)
    jobs = [(model, q) for model in ["base", *NAMES] for q in QUESTIONS]
    loras = {name: LoRARequest(name, i + 1, str(ADAPTERS / name)) for i, name in enumerate(NAMES)}
    expected = [o.outputs[0].text for o in llm.chat(
        [[{"role": "user", "content": q}] for _, q in jobs], SamplingParams(temperature=0, max_tokens=24),
        lora_request=[loras.get(model) for model, _ in jobs], use_tqdm=False)]
    del llm

    args = ["--served-model-name", "base", "--enable-lora", "--max-loras", "2", "--lora-modules",
            *[f"{n}={ADAPTERS / n}" for n in NAMES]]
    for flag, value in ENGINE.items():
        args += [f"--{flag.replace('_', '-')}", str(value)]
    if quantization is not None:
        args += ["--quantization", quantization]
    server = ServerProcess(args, tmp_path / "server.log").wait_healthy()  # no MODEL: the default one
    try:
        async def ask() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
                responses = await asyncio.gather(*[
                    client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=24) for model, q in jobs])
            return [r.choices[0].message.content for r in responses]

        answers = asyncio.run(ask())
    finally:
        assert server.stop() == 0
    assert answers == expected
    upper = "".join(a for (model, _), a in zip(jobs, answers, strict=True) if model == "uppercase")
    assert sum(c.isupper() for c in upper) > 0.8 * sum(c.isalpha() for c in upper)  # the adapter is in effect
