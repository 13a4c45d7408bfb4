"""/v1/completions and /v1/chat/completions: requests become engine requests (one per prompt), engine
outputs become OpenAI responses or server-sent-event chunks."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import jinja2

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.errors import AdapterRemovedError, EngineDeadError, LoRAError, ParamError
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import CompletionOutput, Logprob, RequestOutput, add_delta
from loraserve.sampling_params import SamplingParams
from loraserve.server.adapters import AdapterRegistry, model_not_found
from loraserve.server.metrics import ServerMetrics
from loraserve.server.openai_shapes import chat_logprobs, completion_logprobs, usage
from loraserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request, param_error
from loraserve.server.streaming import DONE, merge, sse

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _Timing:
    """Per engine request, for the latency histograms."""

    tokens: int = 0
    last: float = 0.0
    outcome: str = "aborted"


@dataclass
class _Job:
    """One validated API request, ready to run."""

    kind: str  # "completion" | "chat"
    request: CompletionRequest | ChatCompletionRequest
    lora: LoRARequest | LoRAMix | None
    prompts: list[Prompt]
    params: list[SamplingParams]
    arrival: float
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def param_names(self) -> dict[str, str]:
        """Engine parameter names -> this endpoint's."""
        if self.kind == "chat":
            return {"prompt": "messages", "max_tokens": self.request.max_tokens_param, "logprobs": "top_logprobs"}
        return {}

    @property
    def lora_param(self) -> str:
        """The field an adapter error names: the mix's, or model's."""
        return "adapters" if isinstance(self.lora, LoRAMix) else "model"

    @property
    def adapter_label(self) -> str:
        """The adapter identity as metrics label it: '' for the base model, the adapter's name (with @scale
        when not 1), or the mix's 'name*weight+...'."""
        lora = self.lora
        if lora is None:
            return ""
        if isinstance(lora, LoRAMix):
            return lora.lora_name
        return lora.lora_name if lora.lora_scale == 1 else f"{lora.lora_name}@{lora.lora_scale:g}"


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, adapters: AdapterRegistry, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.adapters = adapters
        self.metrics = metrics
        self.max_model_len = engine.limits.max_model_len

    # ---- entry points: a response body, or an SSE stream -------------------------------------------

    async def completions(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = self.adapters.resolve_request(request.model, request.lora_scale, request.adapters)
        tokenizer = await self._tokenizer(lora)
        prompts = [self._completion_prompt(p, tokenizer) for p in request.prompts()]
        explicit = "max_tokens" in request.model_fields_set
        params = [request.sampling_params(self._max_tokens(p, request.max_tokens, explicit)) for p in prompts]
        return await self._run(_Job("completion", request, lora, prompts, params, arrival))

    async def chat(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = self.adapters.resolve_request(request.model, request.lora_scale, request.adapters)
        prompt = self._chat_prompt(request, await self._tokenizer(lora))
        params = request.sampling_params(request.requested_max_tokens)
        return await self._run(_Job("chat", request, lora, [prompt], [params], arrival))

    # ---- prompts ----------------------------------------------------------------------------------

    async def _tokenizer(self, lora: LoRARequest | LoRAMix | None):
        """The request's tokenizer: its adapter's own (added tokens, chat template) or the model's."""
        try:
            return await self.engine.tokenizer_for(lora)
        except AdapterRemovedError as e:  # unloaded between name lookup and the engine
            raise model_not_found(lora.lora_name) from e
        except LoRAError as e:
            raise bad_request(str(e), "adapters" if isinstance(lora, LoRAMix) else "model") from e

    @staticmethod
    def _completion_prompt(prompt: str | list[int], tokenizer) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(prompt, tokenizer.encode(prompt))
        return Prompt(None, list(prompt))

    @staticmethod
    def _chat_prompt(request: ChatCompletionRequest, tokenizer) -> Prompt:
        conversation = [m.as_template_input() for m in request.messages]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError) as e:
            raise bad_request(f"the messages do not fit the model's chat template: {e}", "messages") from e
        return Prompt(text, tokenizer.encode(text, add_special_tokens=False))

    def _max_tokens(self, prompt: Prompt, requested: int | None, explicit: bool) -> int | None:
        """OpenAI's default of 16 completion tokens, lowered to what fits the context when the client did not
        ask for it (an explicit value that does not fit is refused by the engine, naming the parameter)."""
        if explicit or requested is None:
            return requested
        return max(1, min(requested, self.max_model_len - len(prompt.token_ids)))

    # ---- running --------------------------------------------------------------------------------

    async def _run(self, job: _Job) -> dict | AsyncIterator[str]:
        outputs = self._generate(job)
        if not job.request.stream:
            try:
                totals: dict[int, RequestOutput] = {}
                async for index, output in outputs:  # deltas, added up
                    totals[index] = add_delta(totals.get(index), output)
            finally:
                await outputs.aclose()
            return self._response(job, [totals[i] for i in range(len(job.prompts))])
        try:  # the first output proves the request was accepted; errors before it get a proper status
            first = await anext(outputs)
        except BaseException:
            await outputs.aclose()
            raise
        return self._stream(job, first, outputs)

    async def _generate(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merged outputs of the job's engine requests, recorded in the metrics as they come. What the
        engine refuses becomes the client's 4xx here: a parameter (named as this endpoint names it) or the
        adapter."""
        model, adapter = job.request.model, self.metrics.adapter(job.adapter_label)
        streams = [self.engine.generate(f"{job.request_id}-{i}", p.text, p.token_ids, params, job.lora)
                   for i, (p, params) in enumerate(zip(job.prompts, job.params, strict=True))]
        timings = [_Timing(last=job.arrival) for _ in streams]
        try:
            async for index, output in merge(streams):
                timing = timings[index]
                self._observe(model, adapter, timing, output)
                if output.finished:
                    aborted = any(c.finish_reason == "abort" for c in output.outputs)
                    timing.outcome = "aborted" if aborted else "finished"
                yield index, output
        except Exception as e:
            for timing in timings:
                timing.outcome = "finished" if timing.outcome == "finished" else "failed"
            if isinstance(e, ParamError):
                raise param_error(e, job.param_names) from e
            if isinstance(e, AdapterRemovedError):  # unloaded between name lookup and the engine
                raise model_not_found(model) from e
            if isinstance(e, LoRAError):
                raise bad_request(str(e), job.lora_param) from e
            raise
        finally:
            for timing in timings:
                self.metrics.requests.labels(model, adapter, timing.outcome).inc()

    def _observe(self, model: str, adapter: str, timing: _Timing, output: RequestOutput) -> None:
        new = sum(len(c.token_ids) for c in output.outputs)  # a delta
        if new == 0:
            return
        now = time.monotonic()
        if timing.tokens == 0:
            self.metrics.prompt_tokens.labels(model, adapter).inc(len(output.prompt_token_ids))
            self.metrics.ttft.labels(model).observe(now - timing.last)
        else:
            self.metrics.itl.labels(model).observe(now - timing.last)
        self.metrics.generation_tokens.labels(model, adapter).inc(new)
        timing.tokens, timing.last = timing.tokens + new, now

    # ---- response shapes ------------------------------------------------------------------------

    def _header(self, job: _Job, chunk: bool) -> dict:
        prefix, kind = ("chatcmpl", "chat.completion") if job.kind == "chat" else ("cmpl", "text_completion")
        kind += ".chunk" if chunk and job.kind == "chat" else ""
        return {"id": f"{prefix}-{job.request_id}", "object": kind, "created": job.created, "model": job.request.model}

    def _logprobs(self, job: _Job, token_ids: list[int], entries: list[dict[int, Logprob]] | None,
                  text_offsets: list[int]) -> dict | None:
        if entries is None:
            return None
        if job.kind == "chat":
            return chat_logprobs(token_ids, entries, job.request.top_logprobs or 0)
        return completion_logprobs(token_ids, entries, text_offsets)

    def _response(self, job: _Job, outputs: list[RequestOutput]) -> dict:
        n = job.request.n
        choices = []
        for prompt_index, output in enumerate(outputs):
            for c in output.outputs:
                choice = {"index": prompt_index * n + c.index,
                          "logprobs": self._logprobs(job, c.token_ids, c.logprobs, c.text_offsets),
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if job.kind == "chat":
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append(choice)
        return self._header(job, chunk=False) | {"choices": choices, "usage": usage(outputs)}

    async def _stream(self, job: _Job, first: tuple[int, RequestOutput],
                      outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        request = job.request
        n = request.n
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        header = self._header(job, chunk=True)
        extra = {"usage": None} if include_usage else {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0

        def chunk(index: int, body: dict) -> str:
            return sse(header | {"choices": [{"index": index} | body]} | extra)

        chunk_body: Callable[[CompletionOutput], dict] = (self._chat_delta if job.kind == "chat"
                                                          else self._completion_delta)
        try:
            if job.kind == "chat":
                for index in range(len(job.prompts) * n):
                    yield chunk(index, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None})
            pending: list[tuple[int, RequestOutput]] = [first]
            while True:
                for prompt_index, output in pending:  # deltas: each sample's new part, stop strings held back
                    prompt_tokens[prompt_index] = len(output.prompt_token_ids)
                    for c in output.outputs:
                        completion_tokens += len(c.token_ids)
                        body = chunk_body(c) | {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        body["logprobs"] = self._logprobs(job, c.token_ids, c.logprobs, c.text_offsets)
                        yield chunk(prompt_index * n + c.index, body)
                item = await anext(outputs, None)
                if item is None:
                    break
                pending = [item]
            if include_usage:
                prompt = sum(prompt_tokens.values())
                yield sse(header | {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens":
                                    completion_tokens, "total_tokens": prompt + completion_tokens}})
        except APIError as e:  # headers are sent: report in the stream
            yield sse(e.body())
        except EngineDeadError as e:
            yield sse(APIError(503, f"generation stopped: {e}").body())
        except Exception as e:
            logger.exception("streaming a response failed")
            yield sse(APIError(500, f"internal server error: {e!r}").body())
        finally:
            await outputs.aclose()
        yield DONE

    @staticmethod
    def _chat_delta(delta: CompletionOutput) -> dict:
        return {"delta": {"content": delta.text} if delta.text or delta.finish_reason is None else {}}

    @staticmethod
    def _completion_delta(delta: CompletionOutput) -> dict:
        return {"text": delta.text}
