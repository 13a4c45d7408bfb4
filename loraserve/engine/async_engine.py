"""Async front of the engine for the server: a background thread steps the batch while asyncio handlers
add requests and read their outputs as they are produced.

Only the step thread touches the engine. Handlers post operations (add, abort, stats reads) to an inbox
that the thread runs between steps, so no handler ever waits for a step to end: with a lock shared by
handlers and the step loop, the loop re-took the lock at once after each step and handlers starved,
stalling the event loop for seconds under load.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from loraserve.config import EngineConfig
from loraserve.engine.engine import LLMEngine
from loraserve.lora.request import LoRARequest
from loraserve.outputs import RequestOutput
from loraserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The step loop failed or was shut down; the server should report unhealthy."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # Guards the inbox, the streams and the flags; held only briefly, never during a step.
        self._cv = threading.Condition()
        self._inbox: deque[Callable[[], None]] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._closed = False  # the step thread has ended; nothing more will be run
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._closed and self._thread.is_alive()

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output each time it grows; the last one has finished=True.
        A request the engine refuses raises its ValueError here. Leaving the iteration early (client gone)
        aborts the request and frees its KV blocks."""
        if lora_request is not None:
            # Read and validate the adapter off the event loop and off the step thread, so a slow disk
            # stalls neither other requests nor the batch.
            await asyncio.to_thread(self.engine.prepare_lora, lora_request)
        queue: asyncio.Queue = asyncio.Queue()

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt, prompt_token_ids, params, lora_request)
            except Exception as exc:  # noqa: BLE001 - the caller's error (bad prompt, adapter), not the engine's
                self._deliver(request_id, exc)

        with self._cv:
            if self._closed or self._stopping:
                raise EngineDeadError(f"the engine has stopped: {self.error!r}")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
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

    def abort(self, request_id: str) -> None:
        """Stop a request before the next step (frees its KV blocks); its stream gets nothing more."""
        with self._cv:
            self._streams.pop(request_id, None)
            if not self._closed:
                self._inbox.append(lambda: self.engine.abort_request(request_id))
                self._cv.notify()

    def run_between_steps(self, fn: Callable[..., T], *args: Any) -> T:
        """Call fn(*args) on the step thread between two steps and return its result (for adapter
        management and stats). Blocks until then: call it from a worker thread, not the event loop."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future = Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                future.set_exception(exc)

        with self._cv:
            closed = self._closed
            if not closed:
                self._inbox.append(call)
                self._cv.notify()
        if closed:  # the step thread is gone: nothing else touches the engine
            return fn(*args)
        return future.result()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the step loop; every open stream gets EngineDeadError and its request is aborted."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._cv:
            stream = self._streams.get(request_id)
            if stream is not None and (isinstance(item, BaseException) or item.finished):
                del self._streams[request_id]
        if stream is None:
            return
        loop, queue = stream
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed
            pass

    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    if self._stopping:
                        return
                    ops = list(self._inbox)
                    self._inbox.clear()
                for op in ops:
                    op()
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request, then stop
            logger.exception("engine step failed")
            self.error = exc
            reason = f"engine step failed: {exc!r}"
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        """Run what was posted before the close (so no caller waits forever), fail the open streams,
        abort what is left in the engine."""
        with self._cv:
            self._closed = True
            ops = list(self._inbox)
            self._inbox.clear()
        for op in ops:
            try:
                op()
            except Exception:  # noqa: BLE001 - the engine may be broken; closing goes on
                logger.exception("operation failed while closing the engine")
        with self._cv:
            streams = list(self._streams)
        for request_id in streams:
            self._deliver(request_id, EngineDeadError(reason))
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
