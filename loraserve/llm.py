"""Offline API in vLLM's shape: LLM(...).generate(prompts, params) and .chat(messages)."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from loraserve.config import EngineConfig, LoRAConfig
from loraserve.engine.engine import LLMEngine
from loraserve.lora.request import LoRARequest
from loraserve.outputs import RequestOutput
from loraserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
Conversation = list[dict[str, str]]


class LLM:
    """One base model in memory; requests batched together, each with its own sampling settings and
    optionally its own LoRA adapter."""

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 512, seed: int = 0,
                 enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, lora_dtype: str | torch.dtype = "auto",
                 num_kv_blocks: int | None = None, kv_cache_memory_gb: float | None = None,
                 block_size: int = 16, device: str = "cpu") -> None:
        config = EngineConfig(
            model=model, dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_gb=kv_cache_memory_gb, seed=seed, enable_lora=enable_lora,
            lora=LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
                            lora_dtype=lora_dtype))
        self.engine = LLMEngine(config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (a string or {"prompt_token_ids": [...]}); outputs in input order.

        `sampling_params` and `lora_request` are one for all prompts or a list parallel to them."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), len(prompts),
                             "sampling_params", SamplingParams)
        loras = _per_prompt(lora_request, len(prompts), "lora_request", LoRARequest)
        ids = []
        try:
            for prompt, param, lora in zip(prompts, params, loras):
                text, token_ids = _split_prompt(prompt)
                request_id = str(self._next_id)
                self._next_id += 1
                self.engine.add_request(request_id, text, token_ids, param, lora)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while pending:
                for output in self.engine.step():
                    if output.finished and output.request_id in pending:
                        finished[output.request_id] = output
                        pending.discard(output.request_id)
                        bar.update(1)
        except BaseException:
            for request_id in pending:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]


def _per_prompt(value, count: int, name: str, kind: type) -> list:
    if value is None or isinstance(value, kind):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts; give one, or one per prompt")
    return values


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
        return prompt.get("prompt"), prompt.get("prompt_token_ids")
    raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids'; got {type(prompt).__name__}")
