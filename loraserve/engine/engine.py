"""LLMEngine: add requests, step the batch, get RequestOutputs. Synchronous; the async engine and the
offline LLM both drive it."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from loraserve.config import EngineConfig
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.kv_cache import choose_num_blocks
from loraserve.engine.model_runner import ModelRunner
from loraserve.engine.scheduler import ScheduledSeq, Scheduler
from loraserve.engine.sequence import Sequence
from loraserve.layers.sampler import SamplerOutput
from loraserve.lora.adapter import LoRAAdapter
from loraserve.lora.manager import LoRAManager
from loraserve.lora.request import LoRARequest
from loraserve.model.builder import build_model, load_hf_config
from loraserve.model.loader import DEFAULT_MODEL_NAME, load_tokenizer, resolve_model
from loraserve.outputs import CompletionOutput, Logprob, RequestOutput
from loraserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    lora: LoRARequest | None

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        folder = resolve_model(config.model)
        self.model_path = folder
        self.hf_config = load_hf_config(folder)
        self.tokenizer = load_tokenizer(folder)
        self.max_model_len = self._max_model_len()
        self.model = build_model(folder, self.hf_config, config.torch_dtype, self.device, self.max_model_len)
        num_blocks = config.num_kv_blocks or choose_num_blocks(self.model.spec, config, self.max_model_len)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len="
                f"{self.max_model_len}; lower max_model_len or give the KV cache more blocks or memory")
        self.model.allocate_kv_cache(num_blocks, config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.lora.max_loras if config.enable_lora else None)
        self.eos_token_ids = self._eos_token_ids()
        self.runner = ModelRunner(self.model, config.block_size, self.eos_token_ids)
        self.lora_manager = None
        if config.enable_lora:
            self.lora_manager = LoRAManager(self.model.linear_modules(), config.lora, config.lora_torch_dtype,
                                            config.model or DEFAULT_MODEL_NAME)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        logger.info("model %s: %d layers, dtype %s, max_model_len %d, %d KV blocks of %d tokens",
                    folder, self.model.spec.num_layers, config.torch_dtype, self.max_model_len, num_blocks,
                    config.block_size)

    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN)
        window = getattr(self.hf_config, "sliding_window", None) if getattr(self.hf_config, "use_sliding_window", True) else None
        if window:
            limit = min(limit, window)  # full attention is exact only within the sliding window
        if self.config.max_model_len is None:
            return min(limit, DEFAULT_MAX_MODEL_LEN)
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the model's limit of {limit} tokens")
        return self.config.max_model_len

    def _eos_token_ids(self) -> list[int]:
        ids = set()
        for source in (getattr(self.hf_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return sorted(ids)

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams, lora_request: LoRARequest | None = None) -> None:
        """Queue a request. Raises ValueError (with what to change) for a request that cannot run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = self._check_prompt(prompt_token_ids, params)
        if lora_request is not None:
            self.prepare_lora(lora_request)
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.device).manual_seed(params.seed + index)
            seqs.append(Sequence(next(self._seq_ids), request_id, index, len(prompt_token_ids),
                                 list(prompt_token_ids), params, lora_request, generator))
        detokenizers = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
                        for _ in seqs]
        self.requests[request_id] = _Request(request_id, prompt, prompt_token_ids, seqs, detokenizers, lora_request)
        for seq in seqs:
            self.scheduler.add(seq)

    def _check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_model_len - len(prompt_token_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens but this model's maximum context "
                             f"length is {self.max_model_len}; shorten the prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_token_ids)} and max_tokens asks for {params.max_tokens} more; "
                             f"lower max_tokens to at most {room}")
        return list(prompt_token_ids)

    def prepare_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and validate an adapter into host memory (raises LoRAError saying what is wrong)."""
        if self.lora_manager is None:
            raise ValueError(f"adapter {lora_request.lora_name!r} requested but LoRA is not enabled; start the "
                             f"engine with enable_lora=True (server: --enable-lora)")
        return self.lora_manager.prepare(lora_request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks at once; returns its final output, None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of every request that changed."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        scheduled, lora_slots, failed = self._activate_adapters(scheduled)
        outputs = [self._fail(request_id, reason) for request_id, reason in failed.items()]
        if not scheduled:
            return outputs
        sampled, result = self.runner.run(scheduled, lora_slots)
        for s in scheduled:
            s.seq.num_computed_tokens += s.num_tokens
        if result is None:
            return outputs
        touched = self._append_tokens([s.seq for s in sampled], result)
        for request in touched:
            outputs.append(self._output(request))
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _activate_adapters(self, scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], dict[int, int], dict[str, str]]:
        """Slots for this step's adapters; requests whose adapter cannot be loaded are dropped from the
        step (returned with the reason) and the rest run."""
        if self.lora_manager is None:
            return scheduled, {}, {}
        lora_slots, errors = self.lora_manager.activate(s.seq.lora for s in scheduled if s.seq.lora)
        if not errors:
            return scheduled, lora_slots, {}
        failed = {s.seq.request_id: str(errors[s.seq.lora_id]) for s in scheduled if s.seq.lora_id in errors}
        return [s for s in scheduled if s.seq.request_id not in failed], lora_slots, failed

    def _fail(self, request_id: str, reason: str) -> RequestOutput:
        output = self.abort_request(request_id)
        output.error = reason
        return output

    def _append_tokens(self, seqs: list[Sequence], result: SamplerOutput) -> list[_Request]:
        now = time.monotonic()
        token_ids = result.token_ids.tolist()
        logprobs = self._logprob_dicts(result, [seq.params.logprobs for seq in seqs])
        touched: dict[str, _Request] = {}
        for row, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            token = token_ids[row]
            seq.token_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
            if logprobs is not None and seq.params.logprobs is not None:
                seq.logprobs.append(logprobs[row])
                seq.cumulative_logprob += logprobs[row][token].logprob
            seq.output_text += request.detokenizers[seq.index].add(token)
            self._check_stop(seq, token)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[request.request_id] = request
        return list(touched.values())

    def _logprob_dicts(self, result: SamplerOutput, wanted: list[int | None]) -> list[dict[int, Logprob]] | None:
        if result.logprobs is None:
            return None
        sampled_ids, sampled_lp, ranks = result.token_ids.tolist(), result.logprobs.tolist(), result.ranks.tolist()
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_lp = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        dicts = []
        for row, k in enumerate(wanted):
            entry: dict[int, Logprob] = {}
            for rank in range(k or 0):
                entry[top_ids[row][rank]] = Logprob(top_lp[row][rank], rank + 1)
            entry[sampled_ids[row]] = Logprob(sampled_lp[row], ranks[row])
            for token_id, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([token_id])
            dicts.append(entry)
        return dicts

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
                return
            if params.stop and self._cut_at_stop_string(seq):
                return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def _cut_at_stop_string(seq: Sequence) -> bool:
        """Finish at the first stop string in the text; the text ends before it (or after it when
        include_stop_str_in_output)."""
        text = seq.output_text
        hits = [(text.find(stop), stop) for stop in seq.params.stop if stop in text]
        if not hits:
            return False
        position, stop = min(hits)
        end = position + len(stop) if seq.params.include_stop_str_in_output else position
        seq.output_text = text[:end]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _output(self, request: _Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index, text=seq.output_text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
            for seq in request.seqs
        ]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished=request.finished,
                             lora_name=request.lora.lora_name if request.lora else None)
