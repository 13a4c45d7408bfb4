"""OpenAI request bodies as pydantic models, and the OpenAI error shape.

Request models forbid unknown fields: a client that sends `tools` or `logit_bias` to a server that would
silently ignore them gets an answer that looks right and is not, so such requests are refused by name.
Value ranges (temperature >= 0, 0 < top_p <= 1, ...) are checked once, by SamplingParams.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from loraserve.errors import ParamError
from loraserve.lora_request import MAX_COEFFICIENT
from loraserve.sampling_params import RequestOutputKind, SamplingParams

# Fields of the OpenAI API that loraserve does not implement; each is accepted only at a neutral value
# (by default null, false or empty) so that clients which always send them keep working.
_UNSUPPORTED = ("echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice", "functions", "function_call",
                "parallel_tool_calls", "response_format", "prediction", "audio", "modalities")
_NEUTRAL: dict[str, tuple] = {"best_of": (None, 1), "response_format": (None, {"type": "text"}),
                              "tool_choice": (None, "none")}


# Longer `adapters` lists are refused before anything looks at them (the engine's cap, --max-loras-per-mix, is
# far below; this only keeps a huge body from costing the event loop).
MAX_MIX_ENTRIES = 64


def invalid(param: str, message: str) -> PydanticCustomError:
    """A validation error that names its parameter (read back by the server's error handler)."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})


class APIError(Exception):
    """An error the client gets back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, reason: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = error_type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers
        self.error_id: str | None = None  # a 500's id, matching its log line
        # the metrics' and the log's word for it: a small fixed set, whatever the client sent
        self.reason = reason or code or ("invalid_request" if status == 400 else f"status_{status}")

    @property
    def refusal(self) -> bool:
        """Refused before any work (the client's to change, or the server full), not failed while running."""
        return self.status < 500 or self.reason == "queue_full"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def param_error(error: ParamError, names: dict[str, str] | None = None) -> APIError:
    """A 400 for an engine parameter error, under the API's name for the parameter (`names`: engine name ->
    API name, for the names an endpoint spells differently)."""
    renamed = error.renamed((names or {}).get(error.param, error.param))
    return bad_request(str(renamed), renamed.param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class MixEntry(_Strict):
    """One adapter of a weighted mix: a served adapter name and its weight."""

    name: str = Field(min_length=1)
    weight: float = 1.0


class _GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions, including vLLM's sampling extras and
    loraserve's adapter extras: `lora_scale` (how strongly the adapter named by `model` applies) and
    `adapters` (a weighted mix of served adapters; `model` then names the base model or one of them)."""

    model: str
    lora_scale: float | None = None
    adapters: list[MixEntry] | None = Field(default=None, max_length=MAX_MIX_ENTRIES)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # accepted for compatibility; not used
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in _UNSUPPORTED:
            if data.get(name) not in _NEUTRAL.get(name, (None, False, {}, [])):
                raise invalid(name, f"loraserve does not support {name!r}; leave it out of the request")
        return {k: v for k, v in data.items() if k not in _UNSUPPORTED}

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed together with stream=true")
        return self

    @model_validator(mode="after")
    def _check_adapter_fields(self) -> _GenerationRequest:
        if self.lora_scale is not None and not _coefficient(self.lora_scale):
            raise invalid("lora_scale", f"lora_scale must be a finite number in [0, {MAX_COEFFICIENT:g}], got "
                                        f"{self.lora_scale}")
        if self.adapters is None:
            return self
        if self.lora_scale is not None:
            raise invalid("lora_scale", "lora_scale applies to the one adapter named by model; in a mix give each "
                                        "adapter's strength as its weight in adapters")
        if not self.adapters:
            raise invalid("adapters", "adapters must list at least one {name, weight}; leave it out to use model "
                                      "alone")
        seen: set[str] = set()
        for index, entry in enumerate(self.adapters):
            if not _coefficient(entry.weight):
                raise invalid("adapters", f"adapters[{index}] ({entry.name!r}) has weight {entry.weight}; weights "
                                          f"must be finite numbers in [0, {MAX_COEFFICIENT:g}]")
            if entry.name in seen:
                raise invalid("adapters", f"adapters names {entry.name!r} twice; give each adapter once with its "
                                          f"summed weight")
            seen.add(entry.name)
        return self

    def _sampling_params(self, max_tokens: int | None, max_tokens_param: str, logprobs: int | None,
                         logprobs_param: str) -> SamplingParams:
        """SamplingParams validates every range; its errors name the field, renamed to the request's."""
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                output_kind=RequestOutputKind.DELTA)  # responses are built from deltas: no history copied per token
        except ParamError as e:
            raise param_error(e, {"max_tokens": max_tokens_param, "logprobs": logprobs_param}) from e


def _coefficient(value: float) -> bool:
    return math.isfinite(value) and 0 <= value <= MAX_COEFFICIENT


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_shape(cls, value: Any, handler) -> Any:
        try:
            prompt = handler(value)
        except ValidationError:
            raise invalid("prompt", "prompt must be a string, a list of strings, a list of token ids, or a list "
                          "of token-id lists") from None
        if isinstance(prompt, list) and not prompt:
            raise invalid("prompt", "prompt must not be an empty list")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        return self._sampling_params(max_tokens, "max_tokens", self.logprobs, "logprobs")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """What chat templates expect: content as one string (text parts joined by newlines)."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "\n".join(part.text for part in self.content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_logprob_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise invalid("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
        return self

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_tokens is not None else "max_completion_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, self.max_tokens_param, logprobs, "top_logprobs")


class LoadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # vLLM's field: replace an adapter already served under this name


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM sends it; the name alone identifies the adapter here
