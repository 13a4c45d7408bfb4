"""Adapters that cannot be served, requested through the engine: each is refused with a message that says
what is wrong and what to do, and the same engine goes on serving good requests with unchanged output.

A broken adapter in a `generate` call with good requests fails the whole call before anything runs (the
adapter is read and checked when its request is made; the requests already made are given back), as a
wrong argument would: the caller gets the message at once and no partial batch. Once a request is
accepted it holds its adapter in memory, so nothing that happens to the files afterwards can fail it.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_fixtures import make_peft_adapter, tiny_gpt2, tiny_llama
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.lora.adapter import AdapterNotFoundError, LoRAError
from test_lora_batching import assert_idle
from tiny_models import make_sharp_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = "broken adapters"
QV = ["q_proj", "v_proj"]
ALL_LEAVES = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
BROKEN_ID = 100


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_sharp_tiny_model("llama", tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def hf(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def good(hf, tmp_path_factory) -> LoRARequest:
    return LoRARequest("good", 1, str(make_peft_adapter(hf, tmp_path_factory.mktemp("good"), r=8, target_modules=QV)))


@pytest.fixture(scope="module")
def llm(model_path) -> LLM:
    return LLM(str(model_path), dtype="float32", max_model_len=64, num_kv_blocks=64, block_size=4,
               enable_lora=True, max_loras=2, max_lora_rank=16)


@pytest.fixture(scope="module")
def expected(llm, good) -> dict[str | None, list[int]]:
    """Tokens of the good requests, taken before any broken adapter was tried."""
    tokens = {name: run(llm, lora) for name, lora in (("good", good), (None, None))}
    assert tokens["good"] != tokens[None]  # so serving the good request without its adapter would show
    return tokens


def run(llm: LLM, lora: LoRARequest | None) -> list[int]:
    return llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@dataclass(frozen=True)
class Broken:
    make: Callable[[object, Path], Path]  # (model, empty folder) -> adapter folder
    message: str  # a regex the error message must match
    error: type[LoRAError] = LoRAError


def _qv(hf, folder: Path, **kwargs) -> Path:
    return make_peft_adapter(hf, folder, **({"r": 8, "target_modules": QV} | kwargs))


def _edited(**changes) -> Callable[[object, Path], Path]:
    def make(hf, folder: Path) -> Path:
        _qv(hf, folder)
        edit_config(folder, **changes)
        return folder
    return make


def _without(file: str) -> Callable[[object, Path], Path]:
    def make(hf, folder: Path) -> Path:
        (_qv(hf, folder) / file).unlink()
        return folder
    return make


def _resized(added: int) -> Callable[[object, Path], Path]:
    """An adapter trained after adding `added` tokens: its embedding table and head saved whole."""
    def make(hf, folder: Path) -> Path:
        model = copy.deepcopy(hf)
        model.resize_token_embeddings(model.config.vocab_size + added)
        return _qv(model, folder, modules_to_save=["embed_tokens", "lm_head"])
    return make


def _truncated(hf, folder: Path) -> Path:
    weights = _qv(hf, folder) / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


BROKEN = {
    "rank-above-max": Broken(lambda hf, d: _qv(hf, d, r=64),
                             re.escape("LoRA rank 64 of adapter 'broken' exceeds max_lora_rank=16; "
                                       "restart with --max-lora-rank 64")),
    "target-the-model-lacks": Broken(
        lambda hf, d: make_peft_adapter(tiny_gpt2(), d, r=8, target_modules=["c_attn"]),
        r"target_modules entry 'c_attn' of adapter 'broken' matches no module of model .*; its adaptable modules "
        rf"are: {ALL_LEAVES}"),
    "other-base-hidden-size": Broken(
        lambda hf, d: make_peft_adapter(tiny_llama(hidden_size=32, intermediate_size=64), d, r=8, target_modules=QV),
        r"module 'model\.layers\.0\.self_attn\.q_proj': expected lora_A \(8, 64\) and lora_B \(64, 8\), got "
        r"\(8, 32\) and \(32, 8\); the adapter was likely trained for another base model "
        r"\(base_model_name_or_path='tiny-llama'\)"),
    "missing-folder": Broken(lambda hf, d: d / "nowhere",
                             r"is neither an existing folder nor a hub id in the local Hugging Face cache "
                             r"\(loraserve never downloads\)", AdapterNotFoundError),
    "missing-config": Broken(_without("adapter_config.json"), r"has no adapter_config\.json; pass the folder that "
                             r"PEFT's save_pretrained wrote", AdapterNotFoundError),
    "missing-weights": Broken(_without("adapter_model.safetensors"), r"has adapter_config\.json but no weights; "
                              r"expected adapter_model\.safetensors", AdapterNotFoundError),
    "truncated-safetensors": Broken(_truncated, r"adapter_model\.safetensors is corrupt or truncated"),
    "dora-with-lora-bias": Broken(_edited(use_dora=True, lora_bias=True),
                                  r"lora_bias=True, but PEFT does not define lora_bias together with DoRA"),
    "saves-a-linear-whole": Broken(lambda hf, d: _qv(hf, d, modules_to_save=["gate_proj"]),
                                   r"saves 'model\.layers\.0\.mlp\.gate_proj\.weight' whole \(modules_to_save\); "
                                   r"loraserve serves whole copies of embedding tables, the LM head, norms and biases "
                                   r"only; re-train with LoRA on that module instead"),
    "too-many-added-tokens": Broken(_resized(300), r"its saved 'lm_head\.weight' reaches 572 vocabulary "
                                    r"rows, the base has 272 and --lora-extra-vocab-size allows 256 more; restart with "
                                    r"--lora-extra-vocab-size 300"),
    "unknown-bias-mode": Broken(_edited(bias="some"), r"bias='some', but PEFT's bias must be one of 'none', 'all', "
                                r"'lora_only'"),
    "activated-lora": Broken(_edited(alora_invocation_tokens=[5]), r"uses Activated LoRA \(aLoRA\) "
                             r"\(alora_invocation_tokens=\[5\] in adapter_config\.json\), which loraserve does not "
                             r"support"),
    "matches-no-module": Broken(_edited(layers_to_transform=[7]),
                                r"adapter 'broken' selects no module of model .* so it would change nothing"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_is_refused_and_the_engine_serves_on(case, llm, hf, good, expected, tmp_path):
    broken = BROKEN[case]
    request = LoRARequest("broken", BROKEN_ID, str(broken.make(hf, tmp_path / "adapter")))
    with pytest.raises(broken.error, match=broken.message):
        llm.generate([PROMPT] * 3, GREEDY, use_tqdm=False, lora_request=[good, request, None])
    assert_idle(llm)  # the good requests added before the broken one were aborted
    outputs = llm.generate([PROMPT] * 2, GREEDY, use_tqdm=False, lora_request=[good, None])
    assert [out.outputs[0].token_ids for out in outputs] == [expected["good"], expected[None]]
    assert BROKEN_ID not in llm.engine.lora_manager.host.cached_ids()


def test_adapter_deleted_after_its_request_was_accepted_still_serves_it(model_path, hf, tmp_path):
    """x, y and z are accepted (more than the two host copies max_cpu_loras keeps: adapters of accepted
    requests are always held), then x's folder goes: every request finishes with its own adapter's
    tokens, the step thread never looks at the disk, and once nothing holds x a new request for it is
    refused with the reason."""
    llm = LLM(str(model_path), dtype="float32", max_model_len=64, num_kv_blocks=64, block_size=4,
              enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=16)
    x, y, z = (LoRARequest(name, i, str(_qv(hf, tmp_path / name, seed=i))) for i, name in enumerate("xyz", start=1))
    expected = {lora.lora_name: run(llm, lora) for lora in (x, y, z)}
    assert len({tuple(tokens) for tokens in expected.values()}) == 3
    engine, manager = llm.engine, llm.engine.lora_manager
    for lora in (x, y, z):
        engine.add_request(lora.lora_name, PROMPT, None, GREEDY, lora)
    assert manager.stats().host.cached == 3  # beyond max_cpu_loras while requests hold them
    shutil.rmtree(x.lora_path)

    final = {}
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        final.update((out.request_id, out) for out in engine.step() if out.finished)
    assert {name: final[name].outputs[0].token_ids for name in "xyz"} == expected
    assert_idle(llm)
    assert sorted(manager.host.cached_ids()) == [y.lora_int_id, z.lora_int_id]  # x, least recent, evicted

    with pytest.raises(AdapterNotFoundError, match=rf"adapter 'x': its folder {re.escape(x.lora_path)} does not "
                                                   r"exist \(any more\)"):
        run(llm, x)
    assert run(llm, y) == expected["y"]
    assert_idle(llm)
