"""AsyncLLMEngine: the server's one door into the engine. A background thread steps the batch while asyncio
handlers make requests, read their outputs as they are produced, manage adapters and read stats.

Only the step thread touches the batch. Handlers post operations (add, abort, stats) to an inbox that the
thread runs between steps, so no handler ever waits for a step to end: with a lock shared by handlers and
the step loop, the loop re-took the lock at once after each step and handlers starved, stalling the event
loop for seconds under load. Work that may be slow and touches no batch state (tokenising, checking and
reading a cold adapter from disk) runs in a worker thread before the request is posted, so neither the
event loop nor a step ever waits for a disk. Where the compute threads fill every core, the CPU part of a
cold adapter's load (parsing and checking the bytes that worker read) is posted too, and runs between two
steps: beside a step it slowed that step by several times its own length (lora/manager.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loraserve.config import EngineConfig
from loraserve.engine.engine import LLMEngine
from loraserve.engine.platform import spare_cores
from loraserve.engine.prompt import ChatPrompt
from loraserve.engine.request import Request
from loraserve.engine.stats import EngineStats
from loraserve.errors import EngineDeadError, RequestFailedError
from loraserve.lora.sources import AdapterSources
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import RequestOutput
from loraserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    """What a front end needs to know to shape requests that fit."""

    max_model_len: int
    max_n: int
    lora_enabled: bool
    max_loras: int
    max_lora_rank: int


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, cold_loads_between_steps: bool | None = None) -> None:
        """`cold_loads_between_steps`: where a cold adapter's CPU work runs (see the module's docstring);
        None: between steps when the engine's compute threads leave no core spare."""
        self._engine = engine
        # Guards the inbox, the streams and the flags; held only briefly, never during a step.
        self._cv = threading.Condition()
        self._inbox: deque[Callable[[], None]] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._closed = False  # the step thread has ended; nothing more will be run
        self.error: BaseException | None = None
        self.stopped = threading.Event()  # set once the step thread has ended, for any reason
        config = engine.config
        self.limits = EngineLimits(engine.max_model_len, config.max_n, config.enable_lora, config.lora.max_loras,
                                   config.lora.max_lora_rank)
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        if cold_loads_between_steps is None:
            cold_loads_between_steps = not spare_cores(config.device)
        if engine.lora_manager is not None and cold_loads_between_steps:
            engine.lora_manager.run_cpu_work = self._on_step_thread
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def model_name(self) -> str:
        """The base model as the user named it (the default model's hub id when none was named)."""
        return self._engine.model_name

    @property
    def model_path(self) -> Path:
        """The local folder the base model was loaded from."""
        return self._engine.model_path

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closed and self._thread.is_alive()

    # ---- generation -------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | ChatPrompt | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams, lora_request: LoRARequest | LoRAMix | None = None,
                       **options: Any) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output each time it grows; the last one has finished=True.
        A request that cannot run raises ParamError / LoRAError here, before the first output; one whose
        computation fails (engine/engine.py's fault containment) raises RequestFailedError. Leaving the
        iteration early (client gone) aborts the request and frees its KV blocks. The prompt is prepared
        (tokenised, a chat rendered) in a worker thread; `options` are make_request's keywords."""
        self._check_open()
        request = await self._make(request_id, prompt, prompt_token_ids, params, lora_request, **options)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def add() -> None:
            try:
                self._engine.add(request)
            except Exception as exc:  # noqa: BLE001 - a duplicate id: handed to the caller
                self._deliver(request_id, exc)

        with self._cv:
            if self._closed or self._stopping:
                self._engine.discard(request)
                raise EngineDeadError(self._stopped_reason())
            self._streams[request_id] = (loop, queue)
            self._inbox.append(add)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # refused or failed: nothing left to abort
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def _make(self, *args: Any, **options: Any) -> Request:
        """LLMEngine.make_request in a worker thread. If the caller is cancelled meanwhile, the request made
        anyway is discarded (it holds an adapter)."""
        make = functools.partial(self._engine.make_request, *args, **options)
        future = asyncio.get_running_loop().run_in_executor(None, make)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() is not None else self._engine.discard(f.result()))
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request before the next step (frees its KV blocks); its stream gets nothing more."""
        with self._cv:
            self._streams.pop(request_id, None)
            if not self._closed:
                self._inbox.append(lambda: self._engine.abort_request(request_id))
                self._cv.notify()

    # ---- adapters and stats ----------------------------------------------------------------------

    async def lora_report(self, lora_request: LoRARequest) -> dict:
        """LLMEngine.lora_report in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, self._engine.lora_report, lora_request)

    def lora_report_blocking(self, lora_request: LoRARequest) -> dict:
        """lora_report for code that is not on an event loop (start-up)."""
        return self._engine.lora_report(lora_request)

    @staticmethod
    def adapter_sources(roots: tuple[str, ...], allow_bin: bool) -> Callable[[str, bool], str]:
        """The check a server applies to adapter paths before loading them: `check(path, runtime)` -> the path to
        load, or AdapterSourceError naming the rule (lora/sources.py). Reads the disk: call it off the loop."""
        return AdapterSources(tuple(Path(root) for root in roots), allow_bin).check

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and validate an adapter into host memory (off the event loop); LoRAError says what is wrong."""
        await asyncio.get_running_loop().run_in_executor(None, self.add_lora_blocking, lora_request)

    def add_lora_blocking(self, lora_request: LoRARequest) -> None:
        """add_lora for code that is not on an event loop (start-up): reads the disk in the caller's thread."""
        self._check_open()
        self._engine.add_lora(lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """New requests for the id are refused at once; running ones finish on its weights."""
        return self._engine.remove_lora(lora_int_id)

    def list_loras(self) -> list[int]:
        return self._engine.list_loras()

    async def stats(self) -> EngineStats:
        """A snapshot taken between two steps."""
        return await self._between_steps(self._engine.stats)

    # ---- lifecycle ------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the step loop; every open stream gets EngineDeadError and its request is aborted."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _check_open(self) -> None:
        if self._closed or self._stopping:
            raise EngineDeadError(self._stopped_reason())

    async def _between_steps(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._submit(fn))

    def _on_step_thread(self, fn: Callable[[], T]) -> T:
        """`fn` run by the step thread between two steps, waited for (from any thread; the step thread's
        own calls run at once)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._submit(fn).result()

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future:
        """Queue `fn` for the step thread; once that thread is gone, run it here (nothing else touches the
        engine then). It runs even if its caller stops waiting."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(exc)
            else:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_result(result)

        with self._cv:
            closed = self._closed
            if not closed:
                self._inbox.append(call)
                self._cv.notify()
        if closed:
            call()
        return future

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._cv:
            stream = self._streams.get(request_id)
            if stream is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[request_id]
        if stream is None:
            return
        loop, queue = stream
        with contextlib.suppress(RuntimeError):  # RuntimeError: the handler's loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._engine.has_unfinished_requests()):
                        self._cv.wait()
                    if self._stopping:
                        return
                    ops = list(self._inbox)
                    self._inbox.clear()
                for op in ops:
                    op()
                if self._engine.has_unfinished_requests():
                    for output in self._engine.step():
                        self._deliver(output.request_id, output if output.error is None else _failure(output))
        except BaseException as exc:
            logger.exception("engine step failed")
            self.error = exc
            reason = self._stopped_reason()
        finally:
            self._close(reason)

    def _stopped_reason(self) -> str:
        """Why nothing more will run, for clients: never the exception's text (that goes to the log)."""
        if self.error is None:
            return "the server is shutting down"
        return "the engine stopped after an internal error (the server's log has it)"

    def _close(self, reason: str) -> None:
        """Run what was posted before the close (so no caller waits forever), fail the open streams,
        abort what is left in the engine; then set `stopped`."""
        try:
            with self._cv:
                self._closed = True
                ops = list(self._inbox)
                self._inbox.clear()
            for op in ops:
                try:
                    op()
                except Exception:
                    logger.exception("operation failed while closing the engine")
            with self._cv:
                streams = list(self._streams)
            for request_id in streams:
                self._deliver(request_id, EngineDeadError(reason))
            for request_id in list(self._engine.requests):
                self._engine.abort_request(request_id)
        finally:
            self.stopped.set()


def _failure(output: RequestOutput) -> RequestFailedError:
    """What the stream of a request the engine failed gets: the reason is its failed samples' stop_reason."""
    return RequestFailedError(next(c.stop_reason for c in output.outputs if c.finish_reason == "error"))
