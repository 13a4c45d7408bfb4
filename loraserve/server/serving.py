"""/v1/completions and /v1/chat/completions: requests become engine requests (one per prompt), engine
outputs become OpenAI responses or server-sent-event chunks."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import jinja2

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.lora.adapter import LoRAError
from loraserve.lora.request import LoRARequest
from loraserve.outputs import CompletionOutput, Logprob, RequestOutput
from loraserve.sampling_params import SamplingParams
from loraserve.server.adapters import AdapterRegistry
from loraserve.server.metrics import ServerMetrics
from loraserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several engine requests as they come: (prompt index, output). Leaving early
    or one request failing cancels the others, which aborts them in the engine."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins a stop string: it may yet become the stop, which
    the final text leaves out, so streaming must not send it early."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int  # where `text` starts in the choice's output
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class ChoiceStream:
    """What of one choice has been streamed; each cumulative output yields the part not yet sent."""

    stops: list[str]
    text_sent: int = 0
    tokens_sent: int = 0
    done: bool = False

    def advance(self, c: CompletionOutput) -> Delta | None:
        if self.done:
            return None
        end = len(c.text) if c.finished else max(self.text_sent, len(c.text) - held_back(c.text, self.stops))
        if end == self.text_sent and len(c.token_ids) == self.tokens_sent and not c.finished:
            return None
        delta = Delta(c.text[self.text_sent:end], c.token_ids[self.tokens_sent:],
                      c.logprobs[self.tokens_sent:] if c.logprobs is not None else None, self.text_sent,
                      c.finish_reason, c.stop_reason)
        self.text_sent, self.tokens_sent, self.done = end, len(c.token_ids), c.finished
        return delta


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], text_offset: int) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        top.append({lp.decoded_token: lp.logprob for lp in entry.values()})
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int) -> dict:
    """The chat shape: per token its logprob, bytes and its top_k alternatives by rank."""

    def item(lp: Logprob) -> dict:
        return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode())}

    content = []
    for token_id, entry in zip(token_ids, entries):
        top = sorted((lp for lp in entry.values() if lp.rank <= top_k), key=lambda lp: lp.rank)
        content.append(item(entry[token_id]) | {"top_logprobs": [item(lp) for lp in top]})
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class _Job:
    """One validated API request, ready to run."""

    kind: str  # "completion" | "chat"
    request: CompletionRequest | ChatCompletionRequest
    lora: LoRARequest | None
    prompts: list[Prompt]
    params: list[SamplingParams]
    arrival: float
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, adapters: AdapterRegistry, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.adapters = adapters
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len

    # ---- entry points: a response body, or an SSE stream -------------------------------------------

    async def completions(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = await self._adapter(request.model)
        prompts = [self._completion_prompt(p) for p in request.prompts()]
        explicit = "max_tokens" in request.model_fields_set
        params = [request.sampling_params(self._max_tokens(p, request.max_tokens, explicit, "max_tokens", "prompt"))
                  for p in prompts]
        return await self._run(_Job("completion", request, lora, prompts, params, arrival))

    async def chat(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        arrival = time.monotonic()
        lora = await self._adapter(request.model)
        prompt = self._chat_prompt(request)
        max_tokens = self._max_tokens(prompt, request.requested_max_tokens, True, request.max_tokens_param,
                                      "messages")
        return await self._run(_Job("chat", request, lora, [prompt], [request.sampling_params(max_tokens)], arrival))

    # ---- validation -----------------------------------------------------------------------------

    async def _adapter(self, model: str) -> LoRARequest | None:
        lora = self.adapters.resolve(model)
        if lora is not None:
            try:  # off the event loop: a cold adapter is read from disk while other requests go on
                await asyncio.to_thread(self.engine.engine.prepare_lora, lora)
            except LoRAError as e:
                raise bad_request(str(e), "model") from e
        return lora

    def _completion_prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(prompt, self.tokenizer.encode(prompt))
        return Prompt(None, list(prompt))

    def _chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        conversation = [m.as_template_input() for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError) as e:
            raise bad_request(f"the messages do not fit the model's chat template: {e}", "messages") from e
        return Prompt(text, self.tokenizer.encode(text, add_special_tokens=False))

    def _max_tokens(self, prompt: Prompt, requested: int | None, explicit: bool, param: str,
                    prompt_param: str) -> int | None:
        """Checked here, not only in the engine, to name the parameter; a default that does not fit is
        lowered to what fits instead of refusing a request that did not ask for it."""
        length = len(prompt.token_ids)
        room = self.max_model_len - length
        if not prompt.token_ids:
            raise bad_request("the prompt is empty; give at least one token", prompt_param)
        if room < 1:
            raise bad_request(f"the prompt has {length} tokens but this model's maximum context length is "
                              f"{self.max_model_len}; shorten the {prompt_param}", prompt_param)
        if requested is None or requested <= room:
            return requested
        if not explicit:
            return room
        raise bad_request(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                          f"{length} and {param}={requested} asks for more; lower {param} to at most {room}", param)

    # ---- running --------------------------------------------------------------------------------

    async def _run(self, job: _Job) -> dict | AsyncIterator[str]:
        outputs = self._generate(job)
        if not job.request.stream:
            try:
                finals: dict[int, RequestOutput] = {}
                async for index, output in outputs:
                    if output.finished:
                        finals[index] = output
            finally:
                await outputs.aclose()
            return self._response(job, [finals[i] for i in range(len(job.prompts))])
        try:  # the first output proves the request was accepted; errors before it get a proper status
            first = await anext(outputs)
        except BaseException:
            await outputs.aclose()
            raise
        return self._stream(job, first, outputs)

    async def _generate(self, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merged outputs of the job's engine requests, recorded in the metrics as they come."""
        model = job.request.model
        streams = [self.engine.generate(f"{job.request_id}-{i}", p.text, p.token_ids, params, job.lora)
                   for i, (p, params) in enumerate(zip(job.prompts, job.params))]
        timings = [_Timing(last=job.arrival) for _ in streams]
        try:
            async for index, output in merge(streams):
                timing = timings[index]
                if output.error is not None:
                    timing.outcome = "failed"
                    raise bad_request(f"the request failed: {output.error}", "model")
                self._observe(model, timing, output)
                if output.finished:
                    aborted = any(c.finish_reason == "abort" for c in output.outputs)
                    timing.outcome = "aborted" if aborted else "finished"
                yield index, output
        except Exception as e:
            for timing in timings:
                timing.outcome = "finished" if timing.outcome == "finished" else "failed"
            if isinstance(e, LoRAError):  # the adapter broke between validation and admission
                raise bad_request(str(e), "model") from e
            if isinstance(e, ValueError):  # the engine refused the prompt
                raise bad_request(str(e), "messages" if job.kind == "chat" else "prompt") from e
            raise
        finally:
            for timing in timings:
                self.metrics.requests.labels(model, timing.outcome).inc()

    def _observe(self, model: str, timing: _Timing, output: RequestOutput) -> None:
        tokens = sum(len(c.token_ids) for c in output.outputs)
        if tokens == timing.tokens:
            return
        now = time.monotonic()
        if timing.tokens == 0:
            self.metrics.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
            self.metrics.ttft.labels(model).observe(now - timing.last)
        else:
            self.metrics.itl.labels(model).observe(now - timing.last)
        self.metrics.generation_tokens.labels(model).inc(tokens - timing.tokens)
        timing.tokens, timing.last = tokens, now

    # ---- response shapes ------------------------------------------------------------------------

    def _header(self, job: _Job, chunk: bool) -> dict:
        prefix, kind = ("chatcmpl", "chat.completion") if job.kind == "chat" else ("cmpl", "text_completion")
        kind += ".chunk" if chunk and job.kind == "chat" else ""
        return {"id": f"{prefix}-{job.request_id}", "object": kind, "created": job.created, "model": job.request.model}

    def _logprobs(self, job: _Job, token_ids: list[int], entries: list[dict[int, Logprob]] | None,
                  text_offset: int) -> dict | None:
        if entries is None:
            return None
        if job.kind == "chat":
            return chat_logprobs(token_ids, entries, job.request.top_logprobs or 0)
        return completion_logprobs(token_ids, entries, text_offset)

    def _response(self, job: _Job, outputs: list[RequestOutput]) -> dict:
        n = job.request.n
        choices = []
        for prompt_index, output in enumerate(outputs):
            for c in output.outputs:
                choice = {"index": prompt_index * n + c.index,
                          "logprobs": self._logprobs(job, c.token_ids, c.logprobs, 0),
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
        streams = [ChoiceStream(params.stop) for params in job.params for _ in range(n)]
        latest: dict[int, RequestOutput] = {}

        def chunk(index: int, body: dict) -> str:
            return sse(header | {"choices": [{"index": index} | body]} | extra)

        chunk_body: Callable[[Delta], dict] = self._chat_delta if job.kind == "chat" else self._completion_delta
        try:
            if job.kind == "chat":
                for index in range(len(streams)):
                    yield chunk(index, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None})
            pending: list[tuple[int, RequestOutput]] = [first]
            while True:
                for prompt_index, output in pending:
                    latest[prompt_index] = output
                    for c in output.outputs:
                        index = prompt_index * n + c.index
                        delta = streams[index].advance(c)
                        if delta is not None:
                            body = chunk_body(delta) | {"finish_reason": delta.finish_reason,
                                                        "stop_reason": delta.stop_reason}
                            body["logprobs"] = self._logprobs(job, delta.token_ids, delta.logprobs, delta.text_offset)
                            yield chunk(index, body)
                item = await anext(outputs, None)
                if item is None:
                    break
                pending = [item]
            if include_usage:
                yield sse(header | {"choices": [], "usage": usage(list(latest.values()))})
        except (APIError, LoRAError, ValueError) as e:  # headers are sent: report in the stream
            error = e if isinstance(e, APIError) else bad_request(str(e))
            yield sse(error.body())
        except Exception as e:  # noqa: BLE001 - the engine stopped; tell the client rather than cut the stream
            yield sse(APIError(503, f"generation stopped: {e}").body())
        finally:
            await outputs.aclose()
        yield DONE

    @staticmethod
    def _chat_delta(delta: Delta) -> dict:
        return {"delta": {"content": delta.text} if delta.text or delta.finish_reason is None else {}}

    @staticmethod
    def _completion_delta(delta: Delta) -> dict:
        return {"text": delta.text}
