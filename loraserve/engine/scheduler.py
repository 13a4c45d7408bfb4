"""Continuous batching with a per-step token budget, chunked prefill, preemption by recompute, and
adapter-aware admission (at most max_loras distinct adapters among running sequences). An admitted
sequence starts from its longest cached prefix (block_manager.py)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import Sequence, SequenceStatus

# Steps the oldest adapter-blocked request may be passed over before admission stops behind it, so
# traffic for resident adapters cannot starve a request whose adapter waits for a free slot.
MAX_LORA_BYPASS_STEPS = 16


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step (a prefill chunk, or 1 when decoding)

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence's known tokens, so a token is sampled."""
        return self.num_tokens == self.seq.num_pending_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._bypassed: dict[int, int] = {}  # seq_id -> steps passed over for lack of an adapter slot

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._bypassed.pop(seq.seq_id, None)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below as a victim
                continue
            self._switch_long_rope(seq)
            num_tokens = min(seq.num_pending_tokens, budget)
            while not self.blocks.can_allocate(seq, num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.blocks.allocate(seq, num_tokens)
                scheduled.append(ScheduledSeq(seq, num_tokens))
                budget -= num_tokens
        if not preempted:
            budget = self._admit(budget, scheduled)
        return scheduled

    def _admit(self, budget: int, scheduled: list[ScheduledSeq]) -> int:
        active = {key for seq in self.running for key in _slot_keys(seq)}  # adapters holding slots
        oldest_blocked = True
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if len(active | _slot_keys(seq)) > (self.max_loras or 0):  # it needs slots others hold
                if oldest_blocked:
                    oldest_blocked = False
                    waited = self._bypassed[seq.seq_id] = self._bypassed.get(seq.seq_id, 0) + 1
                    if waited > MAX_LORA_BYPASS_STEPS:
                        break
                continue
            self._switch_long_rope(seq)
            queried = self.blocks.reuse_prefix(seq)
            num_tokens = min(seq.num_pending_tokens, budget)
            if not self.blocks.can_allocate(seq, num_tokens):
                self.blocks.free(seq)
                break
            self.blocks.count_lookup(queried, seq.num_computed_tokens)
            self.waiting.remove(seq)
            self._bypassed.pop(seq.seq_id, None)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            active |= _slot_keys(seq)
            self.blocks.allocate(seq, num_tokens)
            scheduled.append(ScheduledSeq(seq, num_tokens))
            budget -= num_tokens
        return budget

    def _switch_long_rope(self, seq: Sequence) -> None:
        """longrope (Phi-3): once a sequence outgrows the original context, all of it is rotated with the long
        factors, as transformers recomputes it then: its KV is dropped and computed again, from the start."""
        if seq.long_rope_from and len(seq.token_ids) > seq.long_rope_from:
            seq.long_rope_from = 0
            self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's KV and requeue it first in line; its tokens are recomputed later."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


def _slot_keys(seq: Sequence) -> set[str]:
    """The content hashes of the adapters the sequence applies: each takes a slot, whatever its scale."""
    return set() if seq.lora is None else {adapter.content_hash for adapter in seq.lora.adapters}
