"""The thread that reads adapters from disk, at the lowest CPU priority.

Reading, checking and hashing a cold adapter is tens of milliseconds of CPU. Where the decode step keeps
every core busy (its OpenMP threads are as many as the cores), one more runnable thread at normal priority
takes a core from the step's parallel regions, and every region then waits for the descheduled thread: on
two cores that stretched the steps of requests already decoding by several times while adapters loaded.
At nice 19 the read gets the time the step leaves idle instead; it is still fast on an idle machine.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class AdapterReader:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraserve-adapter-read", initializer=_lowest_priority)

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the reader thread; blocks the caller until it is done (exceptions pass through)."""
        return self._pool.submit(fn, *args).result()


def _lowest_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # per-thread nice: Linux; elsewhere a normal thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
