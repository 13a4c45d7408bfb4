"""Incremental detokenisation: turn each new token into the text it adds, without re-decoding the whole
output every step and without emitting half of a multi-byte character.

A window of recent tokens is decoded twice per token: up to the last emitted token (`prefix`) and through
the new one (`full`); the new text is what `full` adds. While `full` ends in U+FFFD the last character may
still be incomplete, so nothing is emitted until a later token completes it; `flush` emits what is held
when the sequence ends, so the final text equals decoding all output tokens at once. A prompt that ends
inside a character gives that character to the output tokens that complete it.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens kept as left context, so tokenizers that drop a leading space at the start of a decode
# (SentencePiece) render the first output token as it reads after the prompt.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._prefix = self._decode(self.ids)
        self.held = 0  # complete characters decoded but not yet emitted (they precede a partial one)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith(_REPLACEMENT):
            self.held = len(full[self._stable(full):].rstrip(_REPLACEMENT))
            return ""
        return self._emit(full)

    def flush(self) -> str:
        """Whatever is held back, even an unfinished character (as U+FFFD): the sequence has ended."""
        if self.read_offset == len(self.ids):
            return ""
        return self._emit(self._decode(self.ids[self.prefix_offset:]))

    def _stable(self, full: str) -> int:
        """Where the new text begins in `full`."""
        prefix = self._prefix
        if prefix.endswith(_REPLACEMENT):
            # Only a prompt can leave the prefix ending in U+FFFD: an invalid byte, which stays in the prompt,
            # or the start of a character the output completes, which then belongs to the output.
            return len(_common_prefix(prefix, full))
        return len(prefix)

    def _emit(self, full: str) -> str:
        self.held = 0
        if len(full) <= len(self._prefix) and not self._prefix.endswith(_REPLACEMENT):
            return ""  # e.g. a skipped special token: nothing new to show
        stable = self._stable(full)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        return full[stable:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]
