"""The demo adapters in examples/adapters do what examples/README.md says, on questions they never saw.

One mixed generate call on the default model serves every question three ways (base, `uppercase`, `json`)
side by side in the same batches. The checks are plain definitions written here: the share of letters that
are upper case, and `json.loads` giving exactly {"answer": <text>}. The base model must fail both checks,
which shows the adapters (not the questions) cause the behaviour and that they do not leak into base rows.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from loraserve import LLM, LoRARequest, SamplingParams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELD_OUT = ["What is gravity?", "Why do dogs bark?", "How do I make a paper airplane?",
            "What is the capital of Norway?", "Who was Charles Darwin?", "Tell me a fun fact about giraffes.",
            "What should I eat for breakfast?", "Name three primary colors."]
ADAPTERS = {"uppercase": LoRARequest("uppercase", 1, str(EXAMPLES / "adapters" / "uppercase")),
            "json": LoRARequest("json", 2, str(EXAMPLES / "adapters" / "json"))}
MAX_TOKENS = {"base": 32, "uppercase": 32, "json": 48}  # json replies are trained to end within ~35 tokens
EOS = 2  # <|im_end|>


def upper_share(texts: list[str]) -> float:
    letters = [ch for text in texts for ch in text if ch.isalpha()]
    return sum(ch.isupper() for ch in letters) / len(letters)


def as_answer(text: str) -> str | None:
    """The answer text if `text` is exactly the JSON object {"answer": "<non-empty text>"}, else None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str):
        return value["answer"].strip() or None
    return None


@pytest.fixture(scope="module")
def replies(default_model_path) -> dict[str, list]:
    """{"base" | adapter name: the CompletionOutput of each HELD_OUT question}, from ONE generate call."""
    llm = LLM(str(default_model_path), dtype="float32", max_model_len=256, num_kv_blocks=256, block_size=16,
              enable_lora=True, max_loras=2, max_lora_rank=16)
    kinds = [kind for _ in HELD_OUT for kind in MAX_TOKENS]  # base, uppercase, json, base, ... interleaved
    questions = [q for q in HELD_OUT for _ in MAX_TOKENS]
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                       [SamplingParams(temperature=0, max_tokens=MAX_TOKENS[kind]) for kind in kinds],
                       lora_request=[ADAPTERS.get(kind) for kind in kinds], use_tqdm=False)
    grouped: dict[str, list] = {kind: [] for kind in MAX_TOKENS}
    for kind, output in zip(kinds, outputs, strict=True):
        assert output.lora_name == (kind if kind in ADAPTERS else None)
        grouped[kind].append(output.outputs[0])
    return grouped


def test_questions_are_held_out(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_demo_adapters", EXAMPLES / "train_demo_adapters.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look up their module while it executes
    spec.loader.exec_module(script)
    trained = {q.lower() for q in script.build_questions()}
    assert trained and not trained & {q.lower() for q in HELD_OUT}


def test_adapter_files_are_small_peft_checkpoints():
    for request in ADAPTERS.values():
        folder = Path(request.lora_path)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] <= 16
        assert (folder / "adapter_model.safetensors").stat().st_size < 10_000_000


def test_uppercase_adapter_answers_in_capitals(replies):
    texts = [c.text for c in replies["uppercase"]]
    assert upper_share(texts) >= 0.9, texts
    assert all(upper_share([t]) >= 0.75 for t in texts), texts
    base = [c.text for c in replies["base"]]
    assert upper_share(base) <= 0.1, base
    assert all(upper_share([t]) < 0.5 for t in base), base


def test_json_adapter_answers_as_json_object(replies):
    for question, completion in zip(HELD_OUT, replies["json"], strict=True):
        assert as_answer(completion.text) is not None, (question, completion.text)
        assert completion.finish_reason == "stop" and completion.token_ids[-1] == EOS, (question, completion)
    assert not any(as_answer(c.text) for c in replies["base"] + replies["uppercase"])
