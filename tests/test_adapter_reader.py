"""Cold adapters are read on one thread at the lowest CPU priority, so the decode step keeps its cores."""
from __future__ import annotations

import os
import sys
import threading

import pytest

from loraserve.lora.reader import AdapterReader


def where() -> tuple[str, int]:
    return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is a Linux feature")
def test_reads_run_on_one_low_priority_thread_and_pass_errors_through():
    reader = AdapterReader()
    name, nice = reader.run(where)
    assert name.startswith("loraserve-adapter-read") and nice == 19
    assert reader.run(where)[0] == name
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the caller keeps its own

    def fail() -> None:
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        reader.run(fail)
