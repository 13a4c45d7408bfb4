"""LLMEngine: make requests, add them, step the batch, get RequestOutputs. Synchronous; the async engine
and the offline LLM both drive it.

A request is made (`make_request`: tokenised, checked, its adapter taken into host memory, read from disk if
it is cold) before it enters the batch (`add`); making touches no state of the batch, so the async engine
does it off the step thread and a disk read never stalls a step. `add_request` does both, for callers that
step the engine themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable

import torch
from transformers import GenerationConfig, PretrainedConfig

from loraserve.config import EngineConfig
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.kv_cache import choose_num_blocks
from loraserve.engine.model_runner import ModelRunner, StepResult
from loraserve.engine.output_processor import OutputProcessor
from loraserve.engine.platform import release_free_memory, resident_bytes, resolve_dtypes
from loraserve.engine.prompt import ChatPrompt, prompt_tokens
from loraserve.engine.request import Request
from loraserve.engine.scheduler import ScheduledSeq, Scheduler
from loraserve.engine.sequence import Sequence
from loraserve.engine.stats import EngineStats
from loraserve.errors import LoRAError, ParamError, RequestFailedError
from loraserve.lora.adapter import LoRAAdapter
from loraserve.lora.applied import AppliedLoRA
from loraserve.lora.manager import LoRAManager
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.model.builder import build_model, load_hf_config
from loraserve.model.loader import DEFAULT_MODEL_NAME, load_tokenizer, resolve_model
from loraserve.model.quantization import resolve_quantization
from loraserve.model.registry import decoder_spec, max_model_len
from loraserve.outputs import RequestMetrics, RequestOutput
from loraserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.dtype, lora_dtype = resolve_dtypes(config)
        self.model_path = resolve_model(config.model, keep_gguf=config.quantization == "gguf")
        self.model_name = config.model or DEFAULT_MODEL_NAME
        hf_config = load_hf_config(self.model_path)
        self.quantization = resolve_quantization(self.model_path, hf_config, config.quantization)
        self.tokenizer = load_tokenizer(self.model_path)
        long_factors = config.lora.long_lora_scaling_factors if config.enable_lora else ()
        self.max_model_len = max_model_len(decoder_spec(hf_config), config.max_model_len, max(long_factors, default=1))
        resident_before = resident_bytes()
        self.model = build_model(self.model_path, hf_config, self.dtype, self.device, self.max_model_len,
                                 self.quantization, rope_factors=(1.0, *long_factors))
        release_free_memory()
        self.weight_bytes = self.model.weight_bytes()
        # what building the model added to the process (weights, and anything loading them left behind)
        self.model_resident_bytes = resident_bytes() - resident_before
        num_blocks = config.num_kv_blocks or choose_num_blocks(self.model.spec, config, self.dtype,
                                                                self.max_model_len)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len="
                f"{self.max_model_len}; lower max_model_len or give the KV cache more blocks or memory")
        self.model.allocate_kv_cache(num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.lora.max_loras if config.enable_lora else None)
        self.eos_token_ids = _eos_token_ids(self.model_path, hf_config, self.tokenizer)
        self.runner = ModelRunner(self.model, config.block_size, self.eos_token_ids, (1.0, *long_factors))
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.lora_manager = None
        if config.enable_lora:
            self.lora_manager = LoRAManager(self.model, config.lora, lora_dtype, self.model_name)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        logger.info("model %s: %d layers, dtype %s, weights %s (%.1f MiB; resident memory +%.1f MiB loading them), "
                    "max_model_len %d, %d KV blocks of %d tokens", self.model_path, self.model.spec.num_layers,
                    self.dtype, self.quantization or "dense", self.weight_bytes / 2**20,
                    self.model_resident_bytes / 2**20, self.max_model_len, num_blocks, config.block_size)

    # ---- making requests: any thread ---------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | ChatPrompt | None, prompt_token_ids: list[int] | None,
                     params: SamplingParams, lora_request: LoRARequest | LoRAMix | None = None, *,
                     fit_max_tokens: bool = False, max_prompt_tokens: int | None = None) -> Request:
        """A request ready to `add`, holding its adapters, its prompt tokenised (a chat rendered) with its
        adapter's tokenizer. Raises ParamError for a request that cannot run (naming the parameter), LoRAError
        for its adapters. Hand it to `add` or to `discard`.

        `fit_max_tokens`: max_tokens is a default the caller did not ask for (OpenAI's 16), lowered to what the
        context has room for instead of refused. `max_prompt_tokens`: a caller's cap below the context."""
        if prompt_token_ids is None and prompt is None:
            raise ParamError("prompt", "give a {param} or prompt_token_ids")
        arrival = time.time()
        request = Request(request_id, None, [], [], lora_request, None, RequestMetrics(arrival_time=arrival))
        try:
            applied = request.lora = self._apply(lora_request, request)
            tokenizer = self.tokenizer_of(applied)
            request.prompt, prompt_token_ids = prompt_tokens(prompt, prompt_token_ids, tokenizer)
            request.prompt_token_ids = prompt_token_ids
            params = self._check(prompt_token_ids, params, applied, fit_max_tokens, max_prompt_tokens)
            request.seqs = [
                Sequence(next(self._seq_ids), request_id, index, len(prompt_token_ids), list(prompt_token_ids),
                         params, detokenizer=self.output_processor.detokenizer(prompt_token_ids, params, tokenizer),
                         lora=applied, generator=_generator(params.sample_seed(index), self.device),
                         long_rope_from=self._long_rope_from(len(prompt_token_ids)))
                for index in range(params.n)
            ]
        except BaseException:
            self.discard(request)
            raise
        return request

    def _long_rope_from(self, prompt_len: int) -> int | None:
        """longrope (Phi-3): Sequence.long_rope_from for a prompt of this length: 0 (long factors) for a prompt
        longer than the original context, else that length (short factors until the sequence outgrows it)."""
        after = self.model.long_rope_after
        if after is None:
            return None
        return 0 if prompt_len > after else after

    def _apply(self, lora_request: LoRARequest | LoRAMix | None, request: Request) -> AppliedLoRA | None:
        """The adapters the request applies, each acquired (held by `request.held` as soon as it is, so a
        failure part-way releases what was taken)."""
        if lora_request is None:
            return None
        if isinstance(lora_request, LoRARequest):
            request.held.append(self._acquire(lora_request))
            return AppliedLoRA.single(request.held[0], lora_request.lora_scale)
        entries = lora_request.adapters
        cap = self.config.lora.max_loras_per_mix
        if len(entries) > cap:
            raise LoRAError(f"a mix of {len(entries)} adapters exceeds max_loras_per_mix={cap}; combine fewer, or "
                            f"restart with --max-loras-per-mix {len(entries)}")
        if len(entries) > self.config.lora.max_loras:
            raise LoRAError(f"a mix of {len(entries)} adapters needs that many slots at once but max_loras="
                            f"{self.config.lora.max_loras}; combine fewer, or restart with --max-loras "
                            f"{len(entries)}")
        terms = []
        for adapter_request, weight in entries:
            request.held.append(self._acquire(adapter_request))
            terms.append((request.held[-1], weight, adapter_request.lora_scale))
        return AppliedLoRA.mixed(terms)

    def tokenizer_of(self, applied: AppliedLoRA | None):
        """The tokenizer a request tokenizes and detokenizes with: its adapter's own (added tokens, its chat
        template) where the adapter folder has one, else the base model's (always for a mix)."""
        tokenizer = applied.tokenizer if applied is not None else None
        return tokenizer if tokenizer is not None else self.tokenizer

    def discard(self, request: Request) -> None:
        """Give back what a made request holds, when it will not be added after all."""
        for adapter in request.held:
            self.lora_manager.release(adapter)
        request.held.clear()
        request.lora = None

    def _check(self, prompt_token_ids: list[int], params: SamplingParams, applied: AppliedLoRA | None,
               fit_max_tokens: bool, max_prompt_tokens: int | None) -> SamplingParams:
        """Every limit of this engine a request must fit, checked once, here; the params it runs with."""
        if not prompt_token_ids:
            raise ParamError("prompt", "the {param} is empty; give at least one token")
        vocab = self.model.spec.vocab_size + (applied.added_tokens if applied is not None else 0)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ParamError("prompt", f"{{param}} token ids must be integers in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids or ()):
            raise ParamError("stop_token_ids", f"{{param}} must be token ids in [0, {vocab})")
        length = len(prompt_token_ids)
        limit = self.max_model_len  # past the model's own context only long-context adapters' requests run
        if applied is None or applied.rope_factor == 1:
            limit = min(limit, self.model.spec.max_position_embeddings)
        if max_prompt_tokens is not None and length > max_prompt_tokens:
            raise ParamError("prompt", f"the {{param}} has {length} tokens but this server accepts at most "
                                       f"{max_prompt_tokens} per prompt (--max-prompt-tokens); shorten the {{param}}")
        room = limit - length
        if room < 1:
            raise ParamError("prompt", f"the {{param}} has {length} tokens but this model's maximum context length "
                                       f"is {limit}; shorten the {{param}}")
        if fit_max_tokens and params.max_tokens is not None and params.max_tokens > room:
            params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        if params.max_tokens is not None and params.max_tokens > room:
            raise ParamError("max_tokens", f"this model's maximum context length is {limit} tokens; "
                                           f"the prompt has {length} and {{param}}={params.max_tokens} asks for "
                                           f"more; lower {{param}} to at most {room}")
        if params.n > self.config.max_n:
            raise ParamError("n", f"{{param}}={params.n} exceeds this engine's limit of {self.config.max_n} samples "
                                  f"per request; lower {{param}}, or start the engine with a larger max_n "
                                  f"(server: --max-n)")
        return params

    def _acquire(self, lora_request: LoRARequest | LoRAMix) -> LoRAAdapter:
        if self.lora_manager is None:
            raise LoRAError(f"adapter {lora_request.lora_name!r} requested but LoRA is not enabled; start the "
                            f"engine with enable_lora=True (server: --enable-lora)")
        return self.lora_manager.acquire(lora_request)

    # ---- adapters: any thread ----------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read, validate and cache an adapter now (binding its id anew if it was removed)."""
        if self.lora_manager is None:
            return self._acquire(lora_request)
        return self.lora_manager.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unbind an adapter id: new requests for it are refused; running ones finish on its weights, then
        its host copy and slot are freed. False if the id was not bound."""
        return self.lora_manager is not None and self.lora_manager.remove(lora_int_id)

    def lora_report(self, lora_request: LoRARequest) -> dict:
        """What the adapter is, as loaded: kinds, ranks, scalings, targets per layer, whole copies, added
        tokens, long-context factor, bytes, content hash (lora/report.py); loads and binds it if needed."""
        if self.lora_manager is None:
            self._acquire(lora_request)  # raises: LoRA is not enabled
        return self.lora_manager.report(lora_request)

    def list_loras(self) -> list[int]:
        return self.lora_manager.host.bound_ids() if self.lora_manager is not None else []

    # ---- the batch: step thread --------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            self.discard(request)
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, lora_request: LoRARequest | None = None) -> None:
        """make_request + add, for callers that step the engine on their own thread."""
        self.add(self.make_request(request_id, prompt, prompt_token_ids, params, lora_request))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks at once; returns its final output, None if unknown."""
        request = self.requests.get(request_id)
        return None if request is None else self._stop(request, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one batch; return the outputs of every request that changed (`finished_only`: of those that
        finished, for a caller that reads only final outputs and need not pay for the others' copies).

        A fault stays with its request: if computing the batch raises, each of its requests is computed again on
        its own (the failed attempt advanced no sequence, and the KV it wrote is written again), and one that
        fails alone, or whose logits are not finite, ends with RequestOutput.error; the others go on as if
        nothing had happened."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        started = time.time()
        failed: dict[str, str] = {}  # request id -> why the engine failed it (RequestFailedError.reason)
        try:
            results = [self._compute(scheduled)]
        except Exception as exc:  # noqa: BLE001 - the requests that caused it fail on their own below
            logger.warning("a step of %d sequences failed (%r); computing each of its requests on its own",
                           len(scheduled), exc)
            results = []
            for request_id, entries in _by_request(scheduled).items():
                try:
                    results.append(self._compute(entries))
                except Exception:
                    logger.exception("request %s failed: the engine could not compute its step", request_id)
                    failed[request_id] = "step_error"
        for result in results:
            for s in result.nonfinite:
                if s.seq.request_id not in failed:
                    logger.error("request %s failed: the model gave it non-finite logits", s.seq.request_id)
                    failed[s.seq.request_id] = "nonfinite_logits"
        for s in scheduled:
            metrics = self.requests[s.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = started
            if s.seq.request_id not in failed:
                s.seq.num_computed_tokens += s.num_tokens
                self.blocks.register_computed(s.seq)
        touched: dict[str, Request] = {}
        for result in results:
            if result.output is None:
                continue
            seqs = [s.seq for s in result.sampled]
            self.output_processor.append(seqs, result.output)
            for seq in seqs:
                if seq.finish_reason is not None:
                    self.scheduler.finish(seq)
                touched[seq.request_id] = self.requests[seq.request_id]
        outputs = [self._fail(self.requests[request_id], reason) for request_id, reason in failed.items()]
        now = time.time()
        for request in touched.values():
            request.metrics.first_token_time = request.metrics.first_token_time or now
            request.metrics.last_token_time = now
            if request.finished:
                outputs.append(self._end(request))
            elif not finished_only and not request.final_only:
                outputs.append(request.output())
        return outputs

    def _compute(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """Put the entries' adapters into slots and run the entries; changes no sequence (ModelRunner.run)."""
        lora_slots = {}
        if self.lora_manager is not None:
            lora_slots = self.lora_manager.activate(adapter for s in scheduled if s.seq.lora is not None
                                                    for adapter in s.seq.lora.adapters)
        return self.runner.run(scheduled, lora_slots)

    def _fail(self, request: Request, reason: str) -> RequestOutput:
        """End a request the engine could not compute, as abort does but with finish_reason "error"; its final
        output. Non-finite KV it may have left is kept from every later request: its blocks leave the prefix
        cache (a prefill's first chunks registered theirs before any logits showed it), and those only it holds
        are zeroed before they are freed."""
        if reason == "nonfinite_logits":
            for seq in request.seqs:
                if not seq.finished:
                    self.runner.zero_kv(self.blocks.forget(seq))
        output = self._stop(request, "error", reason)
        output.error = str(RequestFailedError(reason))
        return output

    def _stop(self, request: Request, finish_reason: str, stop_reason: str | None = None) -> RequestOutput:
        """Finish every unfinished sequence of the request with this reason, free its blocks, end it."""
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
                self.scheduler.finish(seq)
        return self._end(request)

    def _end(self, request: Request) -> RequestOutput:
        """Forget a finished or aborted request and let go of its adapter; its final output."""
        del self.requests[request.request_id]
        self.discard(request)
        request.metrics.finished_time = time.time()
        return request.output()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len({seq.request_id for seq in self.scheduler.running}),
            waiting=len({seq.request_id for seq in self.scheduler.waiting}),
            num_blocks=self.blocks.num_blocks, free_blocks=self.blocks.num_free_blocks,
            preemptions=self.scheduler.num_preemptions, prefix_queried_tokens=self.blocks.queried_tokens,
            prefix_hit_tokens=self.blocks.hit_tokens, weight_bytes=self.weight_bytes,
            model_resident_bytes=self.model_resident_bytes, resident_bytes=resident_bytes(),
            lora=self.lora_manager.stats() if self.lora_manager is not None else None,
            running_adapters=_adapter_names(self.scheduler.running),
            waiting_adapters=_adapter_names(self.scheduler.waiting),
            block_size=self.blocks.block_size, taken_at=time.time())


def _by_request(scheduled: list[ScheduledSeq]) -> dict[str, list[ScheduledSeq]]:
    """The step's entries by request: a request's n sequences are computed, and fail, together."""
    groups: dict[str, list[ScheduledSeq]] = {}
    for s in scheduled:
        groups.setdefault(s.seq.request_id, []).append(s)
    return groups


def _adapter_names(seqs: Iterable[Sequence]) -> tuple[str, ...]:
    """The adapters these sequences apply, by name, sorted, each once (a mix: each of its adapters)."""
    return tuple(sorted({adapter.name for seq in seqs if seq.lora is not None for adapter in seq.lora.adapters}))


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device).manual_seed(seed)


def _eos_token_ids(folder, hf_config: PretrainedConfig, tokenizer) -> list[int]:
    """Every id that ends generation: the model config's, the generation config's, the tokenizer's."""
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    with contextlib.suppress(OSError):  # OSError: no generation_config.json
        sources.append(GenerationConfig.from_pretrained(folder).eos_token_id)
    ids = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)
