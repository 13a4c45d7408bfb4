"""What a request applies: one adapter at a coefficient (its lora_scale), or a weighted mix of several, each
term an adapter held in host memory. Its `key` is the request's adapter identity for prefix-cache keys and
metrics: (content hash, scale) for one adapter, the sorted (hash, weight, scale) list for a mix, so two
requests share KV prefixes exactly when they compute the same thing."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from loraserve.errors import LoRAError
from loraserve.lora.adapter import LoRAAdapter


@dataclass(frozen=True, eq=False)
class AppliedLoRA:
    """`terms`: (adapter, weight, lora_scale) per adapter; `mix`: whether it came as a LoRAMix (even of one)."""

    terms: tuple[tuple[LoRAAdapter, float, float], ...]
    mix: bool = False

    @classmethod
    def single(cls, adapter: LoRAAdapter, lora_scale: float = 1.0) -> AppliedLoRA:
        return cls(((adapter, 1.0, lora_scale),))

    @classmethod
    def mixed(cls, terms: list[tuple[LoRAAdapter, float, float]]) -> AppliedLoRA:
        """A mix, after checking every adapter can be mixed: only terms that add up (rank terms, lora_B biases)
        have a meaning in a sum. Raises LoRAError naming the adapter and what it brings."""
        for adapter, _, _ in terms:
            why = _unmixable(adapter)
            if why:
                raise LoRAError(f"adapter {adapter.name!r} cannot be part of a mix: it {why}; a mix adds the LoRA "
                                f"terms of plain LoRA adapters (PEFT's combination_type='cat'): serve it alone")
        factors = {adapter.rope_factor for adapter, _, _ in terms}
        if len(factors) > 1:
            raise LoRAError(f"the adapters of a mix must share their RoPE factor (long-context LoRA), got "
                            f"{sorted(factors)}: mix adapters trained for the same context")
        return cls(tuple(sorted(terms, key=lambda term: term[0].content_hash)), mix=True)

    @property
    def adapters(self) -> list[LoRAAdapter]:
        return [adapter for adapter, _, _ in self.terms]

    @property
    def coefficients(self) -> list[tuple[LoRAAdapter, float]]:
        """(adapter, weight × lora_scale): what multiplies each adapter's LoRA term."""
        return [(adapter, weight * scale) for adapter, weight, scale in self.terms]

    @cached_property
    def key(self) -> str:
        """The identity: 'hash:scale', or 'mix[hash:weight:scale,...]' sorted by hash (float reprs are exact)."""
        if not self.mix:
            adapter, _, scale = self.terms[0]
            return f"{adapter.content_hash}:{scale!r}"
        return "mix[" + ",".join(f"{a.content_hash}:{w!r}:{s!r}" for a, w, s in self.terms) + "]"

    @property
    def only(self) -> LoRAAdapter | None:
        """The adapter when one is applied outside a mix (its tokenizer, end token and added rows serve the
        request); None for a mix, which uses the base model's."""
        return None if self.mix else self.terms[0][0]

    @property
    def rope_factor(self) -> float:
        return self.terms[0][0].rope_factor

    @property
    def added_tokens(self) -> int:
        return 0 if self.only is None else self.only.added_tokens

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset() if self.only is None else self.only.eos_token_ids

    @property
    def tokenizer(self):
        return None if self.only is None else self.only.tokenizer


def _unmixable(adapter: LoRAAdapter) -> str:
    """Why the adapter brings something a weighted sum does not define, or ''."""
    if any(weights.magnitude is not None for weights in adapter.modules.values()):
        return "is a DoRA adapter (its magnitude rescales the whole adapted weight)"
    if adapter.saved:
        return f"replaces base tensors whole (modules_to_save / trained biases: {sorted(adapter.saved)[0]!r}, ...)"
    if adapter.token_rows:
        return "trains embedding rows (trainable_token_indices)"
    if adapter.added_tokens:
        return f"adds {adapter.added_tokens} tokens to the vocabulary"
    return ""
