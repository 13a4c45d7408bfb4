"""Async front of the engine for the server: a background thread steps the batch while asyncio handlers
add requests and read their outputs as they are produced."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from loraserve.config import EngineConfig
from loraserve.engine.engine import LLMEngine
from loraserve.lora.request import LoRARequest
from loraserve.outputs import RequestOutput
from loraserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop failed; the server should report unhealthy."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards the engine between the step thread and request handlers
        self._wake = threading.Condition(self._lock)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
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
        return self.error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output each time it grows; the last one has finished=True.
        Leaving the iteration early (client gone) aborts the request and frees its KV blocks."""
        if not self.healthy:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if lora_request is not None:
            # Read and validate the adapter off the event loop and outside the engine lock, so a slow
            # disk does not stall other requests.
            await asyncio.to_thread(self.engine.prepare_lora, lora_request)
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            self.engine.add_request(request_id, prompt, prompt_token_ids, params, lora_request)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def run_locked(self, fn, *args):
        """Call fn(*args) on the engine between steps (for adapter management and stats)."""
        with self._lock:
            return fn(*args)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            for request_id in list(self._streams):
                self.engine.abort_request(request_id)
                self._deliver(request_id, EngineDeadError("the server is shutting down"))
            self._wake.notify()
        self._thread.join(timeout)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, queue = stream
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed
            pass

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.engine.has_unfinished_requests():
                        self._wake.wait()
                    if self._stopping:
                        return
                    outputs = self.engine.step()
                    for output in outputs:
                        self._deliver(output.request_id, output)
        except BaseException as exc:  # noqa: BLE001 - report to every waiting request, then stop
            logger.exception("engine step failed")
            self.error = exc
            with self._lock:
                for request_id in list(self._streams):
                    self._deliver(request_id, EngineDeadError(f"engine step failed: {exc!r}"))
