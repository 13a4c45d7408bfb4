"""What the tests of natively served checkpoint-code formats (test_baichuan.py, test_chatglm.py) share: a tiny
checkpoint written in its original layout, served by loraserve, beside the transformers model it converts to
(the reference) and a PEFT adapter in both namings, and the three checks every format must pass against it."""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loraserve import LLM, LoRARequest, SamplingParams
from test_lora_fidelity import engine_logits
from tiny_models import byte_tokenizer

NEW_TOKENS = 32
TOLERANCE = 1e-4
PROMPTS = ["Hello world, this is", "A", "The quick brown fox jumps over the lazy dog; then it",
           "0123456789 counting: 10 11 12 13 14 15 16 17 18 19 20 21 22"]
ENGINE_ARGS = dict(dtype="float32", max_model_len=128, num_kv_blocks=96, block_size=4, enable_lora=True, max_loras=2)


class Served:
    """`path`: the original-layout checkpoint, served by `llm`; `hf`: transformers on the converted weights;
    `adapter_path`: the adapter under the format's module names, `hf_lora`: its converted twin on `hf`."""

    def __init__(self, path: Path, hf, adapter_path: Path, reference_adapter: Path) -> None:
        self.path, self.hf, self.adapter_path = path, hf, adapter_path
        self.lora = LoRARequest("native-adapter", 1, str(adapter_path))
        self.hf_lora = PeftModel.from_pretrained(copy.deepcopy(hf), str(reference_adapter)).eval()
        self.llm = LLM(str(path), **ENGINE_ARGS)

    def ids(self, prompt: str) -> list[int]:
        return self.llm.get_tokenizer().encode(prompt)

    def greedy(self, model, prompt: str) -> list[int]:
        out = model.generate(torch.tensor([self.ids(prompt)]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS)
        return out[0, -NEW_TOKENS:].tolist()


def cached(build: Callable[[Path, str], Served], tmp_path_factory) -> Callable[[str], Served]:
    """`build(root, variant)` once per variant for the module."""
    built: dict[str, Served] = {}

    def get(variant: str) -> Served:
        if variant not in built:
            built[variant] = build(tmp_path_factory.mktemp(variant), variant)
        return built[variant]

    return get


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def check_matches_reference(model: Served, label: str) -> None:
    """Logits within TOLERANCE and NEW_TOKENS greedy tokens identical, on text varied enough to tell."""
    ids = {prompt: model.ids(prompt) for prompt in PROMPTS}
    logits = engine_logits(model.llm, ids, {})
    for prompt, prompt_ids in ids.items():
        with torch.no_grad():
            expected = model.hf(torch.tensor([prompt_ids])).logits[0]
        assert (logits[prompt] - expected).abs().max().item() <= TOLERANCE, f"{label}: {prompt!r}"
    outputs = model.llm.generate(PROMPTS, greedy_params(), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.outputs[0].token_ids == model.greedy(model.hf, prompt), f"{label}: {prompt!r}"
    assert len(set(model.greedy(model.hf, PROMPTS[0]))) > NEW_TOKENS // 4  # varied text: the test has power


def check_adapter_matches_peft(model: Served, label: str) -> None:
    """The adapter under the format's names against PEFT's converted twin: logits and greedy tokens."""
    ids = {prompt: model.ids(prompt) for prompt in PROMPTS[:2]}
    logits = engine_logits(model.llm, ids, {prompt: model.lora for prompt in ids})
    for prompt, prompt_ids in ids.items():
        with torch.no_grad():
            expected = model.hf_lora(input_ids=torch.tensor([prompt_ids])).logits[0]
            base = model.hf(torch.tensor([prompt_ids])).logits[0]
        assert (logits[prompt] - expected).abs().max().item() <= TOLERANCE, f"{label}: {prompt!r}"
        assert (expected - base).abs().max().item() > 0.1  # the adapter changes the logits
    output = model.llm.generate(PROMPTS[2], greedy_params(), lora_request=model.lora, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == model.greedy(model.hf_lora, PROMPTS[2])


def check_mixed_batch(model: Served, label: str) -> None:
    """Prompts with and without the adapter in one batch equal each run alone, and the references."""
    loras = [None, model.lora, model.lora, None]
    together = model.llm.generate(PROMPTS, greedy_params(), lora_request=loras, use_tqdm=False)
    for prompt, lora, output in zip(PROMPTS, loras, together, strict=True):
        alone = model.llm.generate(prompt, greedy_params(), lora_request=lora, use_tqdm=False)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids, f"{label}: {prompt!r}, {lora}"
    assert together[0].outputs[0].token_ids == model.greedy(model.hf, PROMPTS[0])
    assert together[1].outputs[0].token_ids == model.greedy(model.hf_lora, PROMPTS[1])


def write_code_stand_ins(folder: Path, code_files: tuple[str, ...], tokenizer_class: str,
                         tokenizer_module: str) -> None:
    """The checkpoint's code files as stand-ins that raise when imported (none may run), and the byte tokenizer
    saved with tokenizer_config.json mapping AutoTokenizer to checkpoint code, as the releases do."""
    for name in code_files:
        (folder / name).write_text(f"raise RuntimeError('checkpoint code {name} ran')\n")
    byte_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class=tokenizer_class,
                  auto_map={"AutoTokenizer": [f"{tokenizer_module}.{tokenizer_class}", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_packed_adapter(model, folder: Path, targets: list[str], packed: str, target_modules: list[str],
                         rename: Callable[[str], str] = lambda name: name, seed: int = 1) -> tuple[Path, Path]:
    """A PEFT adapter on the format's modules, q/k/v packed as `packed` (a LoRA on a packed module has one A and
    one B of q+k+v rows), and its reference on the converted model (`targets`), where that is A shared by q, k
    and v and B split by rows; `rename`: the converted model's key -> the format's. Returns (adapter, reference)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for layer in peft_model.base_model.model.model.layers:
            attention = layer.self_attn
            for part in (attention.k_proj, attention.v_proj):
                part.lora_A["default"].weight.copy_(attention.q_proj.lora_A["default"].weight)
    reference = folder / "reference"
    peft_model.save_pretrained(reference)
    tensors = load_file(str(reference / "adapter_model.safetensors"))
    parts = {name: [tensor] for name, tensor in tensors.items() if not any(f".{p}_proj." in name for p in "qkv")}
    for name in tensors:  # the file's keys are sorted (k before q): stack in q, k, v order
        if ".q_proj." in name:
            parts[name.replace("q_proj", packed)] = [tensors[name.replace("q_proj", f"{p}_proj")] for p in "qkv"]
    adapter = folder / "native"
    adapter.mkdir()
    save_file({rename(name): (stack[0] if ".lora_A." in name else torch.cat(stack)).contiguous()
               for name, stack in parts.items()}, str(adapter / "adapter_model.safetensors"))
    config = json.loads((reference / "adapter_config.json").read_text())
    config["target_modules"] = target_modules
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter, reference


def random_sharp(model_cls, config, seed: int = 0):
    """A random `model_cls(config)` with sharper weights, for varied, position-dependent text (as
    tiny_models.make_sharp_tiny_model): matrices ×10, norms perturbed, biases drawn at unit scale."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(10.0)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.copy_(torch.randn_like(param))
    return model


def refusal_without_tokenizer_json(checkpoint: Path, tmp_path: Path) -> str:
    """What loading a copy of `checkpoint` without its tokenizer.json says (its tokenizer is checkpoint code)."""
    folder = shutil.copytree(checkpoint, tmp_path / "no-tokenizer-json")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer\.json") as error:
        LLM(str(folder), **ENGINE_ARGS)
    return str(error.value)
