"""`loraserve serve` with a fault planted, for the fault-injection tests: the step thread dies (the scheduler
raises) when a scheduled prompt begins with TRIGGER, token ids no text prompt of the tests produces.
Run as `python tests/fault_server.py serve MODEL ...`."""
from __future__ import annotations

import sys

from loraserve import cli
from loraserve.engine.scheduler import Scheduler

TRIGGER = [7, 7, 7, 7]
_schedule = Scheduler.schedule


def _dying_schedule(self):
    scheduled = _schedule(self)
    if any(s.seq.token_ids[:len(TRIGGER)] == TRIGGER for s in scheduled):
        raise RuntimeError("planted fault: secret-internal-detail")
    return scheduled


if __name__ == "__main__":
    Scheduler.schedule = _dying_schedule
    cli.main(sys.argv[1:])
