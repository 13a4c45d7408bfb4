"""Adapters that add tokens to the vocabulary (--lora-extra-vocab-size): a fine-tune that resized the model
and saved its embedding table and LM head whole, and one that trained only the new rows
(trainable_token_indices), each with its own tokenizer saved beside it.

- Parity: tiny Llama, Phi-3, Mixtral and GPT-BigCode models resized by 8 tokens, prompts using the new ids,
  against transformers + PEFT on the resized model (greedy tokens, full logits within 1e-4, fp32), in one
  batch with a base request whose logits never reach the added columns.
- Use: the default model fine-tuned here for a few steps to answer "<|tool|>" (a new special token), over
  HTTP with the openai client, streamed and not, while base requests in the same batch never produce it.
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from openai import AsyncOpenAI
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_fixtures import make_peft_adapter
from loraserve import LLM, LoRARequest, SamplingParams
from loraserve.model.loader import DEFAULT_MODEL_NAME
from server_utils import ServerProcess
from test_lora_fidelity import TOLERANCE, engine_logits
from tiny_models import make_sharp_tiny_model

ADDED = 8
TOOL = "<|tool|>"
TOOL_PROMPT = "Which tool do you call now?"


# family -> (LoRA targets, its embedding's module name)
FAMILIES = {"llama": (["q_proj", "v_proj"], "embed_tokens"), "phi3": (["qkv_proj", "down_proj"], "embed_tokens"),
            "mixtral": (["q_proj", "v_proj"], "embed_tokens"), "gpt_bigcode": (["c_attn", "c_fc"], "wte")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def resized(request, tmp_path_factory):
    """A sharpened tiny model (vocab 272), a copy resized to 280, and an adapter saved for the copy."""
    folder = tmp_path_factory.mktemp("resized")
    targets, embedding = FAMILIES[request.param]
    path = make_sharp_tiny_model(request.param, folder / "model")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    grown = copy.deepcopy(hf)
    grown.resize_token_embeddings(hf.config.vocab_size + ADDED)
    with torch.no_grad():  # the new rows distinct from each other, as training would leave them
        generator = torch.Generator().manual_seed(1)
        for table in (grown.get_input_embeddings(), grown.get_output_embeddings()):  # one table when tied
            table.weight[-ADDED:].normal_(0, 2.0, generator=generator)
    adapter = make_peft_adapter(grown, folder / "adapter", seed=3, r=8, lora_alpha=16, target_modules=targets,
                                modules_to_save=[embedding, "lm_head"])
    return path, hf, grown, adapter


def test_resized_vocabulary_matches_peft_beside_a_base_request(resized):
    path, hf, grown, adapter = resized
    vocab = hf.config.vocab_size
    prompt = [1, 70, vocab + 2, 90, vocab + 7, 100, vocab]  # new ids inside the prompt
    peft = PeftModel.from_pretrained(grown, str(adapter)).eval()
    with torch.no_grad():
        out = peft.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                            pad_token_id=0)
        reference_ids = out[0].tolist()
        reference_logits = peft(input_ids=out).logits[0]
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64,
              num_kv_blocks=64, block_size=4)
    lora = LoRARequest("grown", 1, str(adapter))
    base_prompt = [1, 70, 80, 90]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    ours, base = llm.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": base_prompt}], params,
                              use_tqdm=False, lora_request=[lora, None])
    assert prompt + list(ours.outputs[0].token_ids) == reference_ids
    assert any(t >= vocab for t in ours.outputs[0].token_ids)  # it does answer with added tokens
    logits = engine_logits(llm, {"grown": reference_ids, "base": base_prompt}, {"grown": lora})
    assert (logits["grown"] - reference_logits).abs().max().item() < TOLERANCE
    # in the same forward the base row's logits widen too, its added columns at -inf: never sampled
    assert logits["base"].shape[1] == vocab + ADDED and torch.isneginf(logits["base"][:, vocab:]).all()
    assert all(t < vocab for t in base.outputs[0].token_ids)
    with pytest.raises(ValueError, match=rf"token ids must be integers in \[0, {vocab}\)"):
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)  # added ids are the adapter's only


@pytest.fixture(scope="module")
def tool_adapter(default_model_path, tmp_path_factory) -> Path:
    """The default model fine-tuned (a few Adam steps) to answer the chat question with a new special token:
    the token is added to a copy of the tokenizer, the model resized by one row, and only that row is trained
    (trainable_token_indices) with a rank-8 LoRA on q/v; tokenizer saved beside the adapter."""
    folder = tmp_path_factory.mktemp("tool")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [TOOL]})
    tool_id = tokenizer.convert_tokens_to_ids(TOOL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            trainable_token_indices=[tool_id]))
    text = tokenizer.apply_chat_template([{"role": "user", "content": TOOL_PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([prompt + [tool_id] * 3])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    optimizer = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=0.05)
    for _ in range(25):
        loss = peft(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, loss.item()
    peft.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_trained_token_answers_offline_and_never_reaches_base_requests(default_model_path, tool_adapter):
    llm = LLM(str(default_model_path), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8,
              max_model_len=256, num_kv_blocks=64)
    lora = LoRARequest("tool", 1, str(tool_adapter))
    params = SamplingParams(temperature=0, max_tokens=3, skip_special_tokens=False)
    messages = [{"role": "user", "content": TOOL_PROMPT}]
    tooled, base = llm.chat([messages, messages], params, use_tqdm=False, lora_request=[lora, None])
    vocab = llm.engine.model.spec.vocab_size
    assert tooled.outputs[0].token_ids == [vocab] * 3 and tooled.outputs[0].text == TOOL * 3
    assert all(t < vocab for t in base.outputs[0].token_ids) and TOOL not in base.outputs[0].text


async def _ask(client: AsyncOpenAI, model: str, stream: bool) -> str:
    extra = {"skip_special_tokens": False}
    messages = [{"role": "user", "content": TOOL_PROMPT}]
    if not stream:
        response = await client.chat.completions.create(model=model, messages=messages, max_tokens=3,
                                                        temperature=0, extra_body=extra)
        return response.choices[0].message.content
    chunks = await client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                                  extra_body=extra, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


def test_trained_token_over_http_streamed_and_not(default_model_path, tool_adapter, tmp_path):
    server = ServerProcess(["--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-loras", "2",
                            "--max-lora-rank", "8", "--lora-modules", f"tool={tool_adapter}"],
                           tmp_path / "server.log").wait_healthy()
    try:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")

        async def both() -> list[str]:  # base and adapter requests in flight together
            asks = [_ask(client, model, stream) for model in ("tool", DEFAULT_MODEL_NAME)
                    for stream in (False, True)]
            return await asyncio.gather(*asks)

        tool_plain, tool_streamed, base_plain, base_streamed = asyncio.run(both())
        assert tool_plain == tool_streamed == TOOL * 3
        assert TOOL not in base_plain and base_plain == base_streamed
    finally:
        server.stop()


def test_an_adapters_own_end_token_ends_its_requests_only(resized, tmp_path):
    """A tokenizer saved beside an adapter with an end token of its own: that adapter's requests stop on it
    (finish_reason "stop"), and min_tokens holds it back as it holds the model's own; base requests run on."""
    path, hf, _, _ = resized
    adapter = make_peft_adapter(hf, tmp_path / "plain", seed=5, r=8, lora_alpha=16, target_modules="all-linear")
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=16, max_model_len=64,
              num_kv_blocks=64, block_size=4)  # rank 16: all-linear doubles Mixtral's gate_up rank
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=False)
    prompt = [{"prompt_token_ids": [1, 70, 80, 90]}]
    free = llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("plain", 1, str(adapter)))
    tokens = list(free[0].outputs[0].token_ids)
    stop_at = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokens[stop_at])
    tokenizer.save_pretrained(adapter)  # now the adapter folder carries a tokenizer with its own end token
    ending = LoRARequest("ending", 2, str(adapter))
    ended, base = llm.generate(prompt * 2, params, use_tqdm=False, lora_request=[ending, None])
    assert list(ended.outputs[0].token_ids) == tokens[:stop_at + 1]
    assert ended.outputs[0].finish_reason == "stop"
    assert len(base.outputs[0].token_ids) == 12 or base.outputs[0].token_ids[-1] in llm.engine.eos_token_ids
    held = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=stop_at + 2),
                        use_tqdm=False, lora_request=ending)
    assert tokens[stop_at] not in held[0].outputs[0].token_ids[:stop_at + 2]
