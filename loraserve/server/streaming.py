"""Server-sent events: interleaving the outputs of a request's prompts, and deciding how much of each choice's
text may be sent yet (a possible stop string is held back, so the stream never shows text the final answer
leaves out)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraserve.outputs import CompletionOutput, Logprob, RequestOutput

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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
    text_offsets: list[int]  # per token of `token_ids`, where its text begins in the choice's output
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
                      c.logprobs[self.tokens_sent:] if c.logprobs is not None else None,
                      c.text_offsets[self.tokens_sent:], c.finish_reason, c.stop_reason)
        self.text_sent, self.tokens_sent, self.done = end, len(c.token_ids), c.finished
        return delta
