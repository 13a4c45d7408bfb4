"""Paged KV cache bookkeeping: fixed-size blocks, each sequence's block table, and automatic prefix caching.

Prefix caching: a block whose tokens are all computed is registered under a key that chains the previous
block's key, its own tokens and the adapter's content hash, so a key names exactly the KV of one token
prefix under one adapter (KV computed under one adapter is wrong for another, and for the base model). A
new sequence starts from the longest run of registered blocks its tokens match, instead of recomputing
them. Blocks are reference counted; a block no sequence holds goes to the free list but keeps its KV and
its key until the block is handed out again, least recently freed first, so a shared system prompt stays
cached for as long as memory allows.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from loraserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix key -> block holding that KV
        self.key_of: dict[int, bytes] = {}  # the reverse, for registered blocks
        self.queried_tokens = 0  # tokens of admitted sequences looked up in the cache, and those found there
        self.hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks for the sequence to hold num_new_tokens more tokens' K/V."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            self._unregister(block)  # evicted: its KV is about to be overwritten
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def forget(self, seq: Sequence) -> list[int]:
        """Take the sequence's blocks out of the prefix cache (their KV must not be reused: a failed request's
        may not be finite); returns those only it holds, which the caller may clear before they are freed."""
        for block in seq.block_table:
            self._unregister(block)
        return [block for block in seq.block_table if self.ref_counts[block] == 1]

    def _unregister(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]

    def free(self, seq: Sequence) -> None:
        """Let go of the sequence's blocks; the last block of a sequence is the first to be reused."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0

    def reuse_prefix(self, seq: Sequence) -> int:
        """Start a sequence that holds no blocks from the longest cached prefix of its tokens; returns the
        tokens looked up. At least one token is left to compute, so the step that finishes the prompt
        produces its logits. If the sequence is then not admitted, `free` gives the blocks back."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        usable = (len(seq.token_ids) - 1) // self.block_size
        keys: list[bytes] = []
        for index in range(usable):
            key = self._key(seq, index, keys[-1] if keys else b"")
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            keys.append(key)
        seq.block_keys = keys
        seq.num_computed_tokens = len(keys) * self.block_size
        return usable * self.block_size

    def count_lookup(self, queried: int, hit: int) -> None:
        """Hit-rate accounting, once per admitted sequence."""
        self.queried_tokens += queried
        self.hit_tokens += hit

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full of computed tokens (after a step). A block whose
        key another block already holds stays private (same KV, computed twice in one step)."""
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_keys), seq.num_computed_tokens // self.block_size):
            key = self._key(seq, index, seq.block_keys[-1] if seq.block_keys else b"")
            seq.block_keys.append(key)
            block = seq.block_table[index]
            if key not in self.cached and block not in self.key_of:
                self.cached[key] = block
                self.key_of[block] = key

    def _key(self, seq: Sequence, index: int, parent: bytes) -> bytes:
        tokens = seq.token_ids[index * self.block_size:(index + 1) * self.block_size]
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens).tobytes())
        digest.update((seq.lora_key or "").encode())
        if seq.long_rope_from is not None:  # the RoPE table the KV was rotated with
            digest.update(seq.long_rope_from.to_bytes(8, "little"))
        return digest.digest()
