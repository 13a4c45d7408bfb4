"""/v1/completions and /v1/chat/completions: requests become engine requests (one per prompt), engine
outputs become OpenAI responses or server-sent-event chunks."""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.prompt import ChatPrompt
from loraserve.errors import AdapterRemovedError, LoRAError, ParamError, RequestFailedError
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import CompletionOutput, Logprob, RequestOutput, add_delta
from loraserve.sampling_params import SamplingParams
from loraserve.server.adapters import AdapterRegistry, model_not_found
from loraserve.server.error_handlers import ErrorReporter, as_api_error, internal_error
from loraserve.server.metrics import ServerMetrics
from loraserve.server.openai_shapes import chat_logprobs, completion_logprobs, usage
from loraserve.server.policy import Admission, Limits, Principal
from loraserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request, param_error
from loraserve.server.streaming import DONE, merge, sse


class _Reloaded(Exception):
    """A job's adapter was reloaded in place before the engine took it: run it again under the new weights."""

    def __init__(self, lora: LoRARequest | LoRAMix) -> None:
        super().__init__()
        self.lora = lora


@dataclass
class _Timing:
    """Per engine request, for the latency histograms."""

    tokens: int = 0
    last: float = 0.0
    outcome: str = "aborted"
    started: bool = False  # has produced an output: no longer waiting


@dataclass
class _Job:
    """One validated API request, ready to run."""

    kind: str  # "completion" | "chat"
    request: CompletionRequest | ChatCompletionRequest
    principal: Principal
    lora: LoRARequest | LoRAMix | None
    prompts: list[str | list[int] | ChatPrompt]  # prepared (tokenised, rendered) by the engine, off the loop
    params: SamplingParams
    fit_max_tokens: bool  # max_tokens is OpenAI's default, lowered to what fits; an explicit one is checked
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
    def __init__(self, engine: AsyncLLMEngine, adapters: AdapterRegistry, metrics: ServerMetrics, limits: Limits,
                 admission: Admission, report: ErrorReporter) -> None:
        self.engine = engine
        self.adapters = adapters
        self.metrics = metrics
        self.limits = limits
        self.admission = admission
        self.report = report

    # ---- entry points: a response body, or an SSE stream -------------------------------------------

    async def completions(self, request: CompletionRequest, principal: Principal) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = self.adapters.resolve_request(request.model, request.lora_scale, request.adapters, principal)
        prompts = request.prompts()
        if len(prompts) > self.limits.max_prompts:
            raise APIError(400, f"prompt lists {len(prompts)} prompts; this server takes at most "
                           f"{self.limits.max_prompts} per request (--max-prompts-per-request); split the request",
                           "prompt", reason="too_many_prompts")
        explicit = "max_tokens" in request.model_fields_set
        return await self._run(_Job("completion", request, principal, lora, prompts, self._params(request),
                                    not explicit, arrival))

    async def chat(self, request: ChatCompletionRequest, principal: Principal) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = self.adapters.resolve_request(request.model, request.lora_scale, request.adapters, principal)
        prompt = ChatPrompt([m.as_template_input() for m in request.messages])
        return await self._run(_Job("chat", request, principal, lora, [prompt], self._params(request), False,
                                    arrival))

    def _params(self, request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
        """The request's sampling parameters, within this server's limits on stop strings."""
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        for param, values in (("stop", stops), ("stop_token_ids", request.stop_token_ids or [])):
            if len(values) > self.limits.max_stop:
                raise APIError(400, f"{param} has {len(values)} entries; this server takes at most "
                               f"{self.limits.max_stop} (--max-stop-strings)", param, reason="too_many_stops")
        longest = max(map(len, stops), default=0)
        if longest > self.limits.max_stop_length:
            raise APIError(400, f"a stop string has {longest} characters; this server takes at most "
                           f"{self.limits.max_stop_length} (--max-stop-length)", "stop", reason="stop_too_long")
        if isinstance(request, ChatCompletionRequest):
            return request.sampling_params(request.requested_max_tokens)
        return request.sampling_params(request.max_tokens)

    # ---- running --------------------------------------------------------------------------------

    async def _run(self, job: _Job) -> dict | AsyncIterator[str]:
        """Run the job; if its adapter was reloaded in place between the name's lookup and the engine taking
        it (the old weights freed meanwhile), run it once more on what the name serves now."""
        try:
            return await self._start(job)
        except _Reloaded as reloaded:
            return await self._start(dataclasses.replace(job, lora=reloaded.lora))

    async def _start(self, job: _Job) -> dict | AsyncIterator[str]:
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
        """Merged outputs of the job's engine requests, recorded in the metrics as they come, within the
        admission limits (a ticket held until the end, whichever way it comes). What the engine refuses becomes
        the client's 4xx here: a parameter (named as this endpoint names it) or the adapter."""
        ticket = self.admission.enter(job.principal, len(job.prompts))
        model, adapter = job.request.model, self.metrics.adapter(job.adapter_label)
        options = {"fit_max_tokens": job.fit_max_tokens, "max_prompt_tokens": self.limits.max_prompt_tokens}
        streams = [self.engine.generate(f"{job.request_id}-{i}", None if isinstance(p, list) else p,
                                        p if isinstance(p, list) else None, job.params, job.lora, **options)
                   for i, p in enumerate(job.prompts)]
        timings = [_Timing(last=job.arrival) for _ in streams]
        try:
            async for index, output in merge(streams):
                timing = timings[index]
                if not timing.started:
                    timing.started = True
                    ticket.started()
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
            if isinstance(e, AdapterRemovedError):  # unloaded (or reloaded) between name lookup and the engine
                lora = None if any(timing.started for timing in timings) else self._now_served(job)
                if lora is not None:
                    raise _Reloaded(lora) from e
                raise model_not_found(model) from e
            if isinstance(e, LoRAError):
                raise bad_request(str(e), job.lora_param) from e
            if isinstance(e, RequestFailedError):  # the engine logged the fault under the engine request's id
                error = APIError(500, f"internal error computing this request ({e.reason}); the server's log has "
                                 f"it under request id {job.request_id}", reason=e.reason)
                error.error_id = job.request_id
                raise error from e
            raise
        finally:
            ticket.close()
            for timing in timings:
                self.metrics.requests.labels(model, adapter, timing.outcome).inc()

    def _now_served(self, job: _Job) -> LoRARequest | LoRAMix | None:
        """What the job's adapter names serve now if that is other weights (a reload in place); else None."""
        try:
            lora = self.adapters.resolve_request(job.request.model, job.request.lora_scale, job.request.adapters,
                                                 job.principal)
        except APIError:  # unloaded: nothing to run again on
            return None
        return lora if lora != job.lora else None

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
        except Exception as e:  # noqa: BLE001 - headers are sent: every error is reported in the stream
            error = as_api_error(e) or internal_error(e, f"streaming response {header['id']} failed")
            self.report(error, job.principal.tenant, "POST", f"/v1/{self._path(job)}")
            yield sse(error.body())
        finally:
            await outputs.aclose()
        yield DONE

    @staticmethod
    def _path(job: _Job) -> str:
        return "chat/completions" if job.kind == "chat" else "completions"

    @staticmethod
    def _chat_delta(delta: CompletionOutput) -> dict:
        return {"delta": {"content": delta.text} if delta.text or delta.finish_reason is None else {}}

    @staticmethod
    def _completion_delta(delta: CompletionOutput) -> dict:
        return {"text": delta.text}
