"""Offline API in vLLM's shape: LLM(...).generate(prompts, params) and .chat(messages)."""
from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from loraserve.config import EngineConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.prompt import ChatPrompt
from loraserve.errors import ParamError
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import RequestOutput
from loraserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any] | ChatPrompt
Conversation = list[dict[str, str]]


class LLM:
    """One base model in memory; requests batched together, each with its own sampling settings and
    optionally its own LoRA adapter."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        """`model`: a Hugging Face model folder, a hub id in the local cache, or a .gguf file (None: the
        default model). `options`: any EngineConfig or LoRAConfig field by name (dtype, max_model_len,
        max_num_seqs, enable_lora, max_loras, max_lora_rank, ...); an unknown name raises TypeError."""
        self._start(EngineConfig.from_options(model=model, **options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
                 lora_request: LoRARequest | LoRAMix | Seq[LoRARequest | LoRAMix | None] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for every prompt (a string, {"prompt_token_ids": [...]} or a ChatPrompt); outputs in input
        order.

        `sampling_params` and `lora_request` are one for all prompts or a list parallel to them; an adapter is
        a LoRARequest (with its lora_scale) or a weighted LoRAMix of several."""
        if isinstance(prompts, (str, dict, ChatPrompt)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), len(prompts),
                             "sampling_params", SamplingParams)
        loras = _per_prompt(lora_request, len(prompts), "lora_request", (LoRARequest, LoRAMix))
        requests = []
        try:
            for prompt, param, lora in zip(prompts, params, loras, strict=True):
                text, token_ids = _split_prompt(prompt)
                requests.append(self.engine.make_request(str(self._next_id), text, token_ids, param, lora))
                self._next_id += 1
        except Exception:
            for request in requests:
                self.engine.discard(request)
            raise
        for request in requests:
            self.engine.add(request)
        return self._run([request.request_id for request in requests], use_tqdm)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and validate an adapter now rather than at its first request; binds its id anew if it was
        removed."""
        self.engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unbind an adapter id; a later request for it is refused until it is added again."""
        return self.engine.remove_lora(lora_int_id)

    def lora_report(self, lora_request: LoRARequest) -> dict:
        """The adapter's load report: kinds, rank and scaling per module, targets per layer, saved modules,
        added tokens, long-context factor, host and slot bytes, content hash, path."""
        return self.engine.lora_report(lora_request)

    def list_loras(self) -> list[int]:
        return self.engine.list_loras()

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request: LoRARequest | LoRAMix | Seq[LoRARequest | LoRAMix | None] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate (an adapter saved with
        its own tokenizer brings its own template)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [ChatPrompt(conversation, add_generation_prompt) for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while pending:
                for output in self.engine.step(finished_only=True):
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


def _per_prompt(value, count: int, name: str, kind: type | tuple[type, ...]) -> list:
    if value is None or isinstance(value, kind):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts; give one, or one per prompt")
    return values


def _split_prompt(prompt: PromptType) -> tuple[str | ChatPrompt | None, list[int] | None]:
    if isinstance(prompt, (str, ChatPrompt)):
        return prompt, None
    if isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
        return prompt.get("prompt"), prompt.get("prompt_token_ids")
    raise ParamError("prompt", f"a {{param}} must be a string or a dict with 'prompt_token_ids'; got "
                               f"{type(prompt).__name__}")
