"""The adapter a request asks for, in vLLM's shape. It sits at the bottom floor because requests and their
outputs (RequestOutput.lora_request) carry it through every layer."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoRARequest:
    """Names an adapter: `lora_int_id` (> 0) is its identity in the engine's caches and must always name the
    same adapter; `lora_path` is a local PEFT folder or a hub id found in the local Hugging Face cache.

    `lora_scale` multiplies the adapter's own scaling (alpha/r, or alpha/√r with rsLoRA) for this request:
    0.5 applies it at half strength, 0 not at all (for a plain LoRA adapter: the base model exactly). Requests
    at any scale share the adapter's one host copy and slot.

    `lora_local_path` is vLLM's deprecated spelling of `lora_path`: accepted with a warning, giving the same
    object (it takes no part in equality or hashing)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    lora_local_path: str | None = field(default=None, compare=False, repr=False)
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lora_local_path is not None:
            warnings.warn("LoRARequest(lora_local_path=...) is deprecated; use lora_path", DeprecationWarning,
                          stacklevel=3)
            if self.lora_path and self.lora_path != self.lora_local_path:
                raise ValueError(f"adapter {self.lora_name!r}: lora_path={self.lora_path!r} and lora_local_path="
                                 f"{self.lora_local_path!r} disagree; give only lora_path")
            object.__setattr__(self, "lora_path", self.lora_local_path)
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not self.lora_name or not isinstance(self.lora_name, str):
            raise ValueError("lora_name must be a non-empty string")
        if not self.lora_path or not isinstance(self.lora_path, str):
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must be a non-empty path or hub id")
        object.__setattr__(self, "lora_scale", _coefficient(self.lora_scale, f"lora_scale of adapter "
                                                                             f"{self.lora_name!r}"))


@dataclass(frozen=True)
class LoRAMix:
    """Several adapters applied together, each with a weight: every adapted layer computes
    W₀x + Σᵢ wᵢ · sᵢ · Bᵢ(Aᵢx), sᵢ being adapter i's own scaling times its `lora_scale` (PEFT's
    add_weighted_adapter with combination_type="cat"). Accepted wherever a LoRARequest is. Each adapter keeps
    its own host copy and slot, so any number of mixes of the same adapters cost no extra memory.

    LoRAMix([(LoRARequest("sql", 1, path_a), 0.7), (LoRARequest("json", 2, path_b), 0.3)])"""

    adapters: tuple[tuple[LoRARequest, float], ...]

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str | bytes) or not isinstance(self.adapters, Iterable):
            raise ValueError("LoRAMix takes a list of (LoRARequest, weight) pairs")
        entries = []
        for entry in self.adapters:
            if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], LoRARequest)):
                raise ValueError(f"LoRAMix takes (LoRARequest, weight) pairs, got {entry!r}")
            entries.append((entry[0], _coefficient(entry[1], f"weight of adapter {entry[0].lora_name!r}")))
        if not entries:
            raise ValueError("LoRAMix needs at least one (LoRARequest, weight) pair")
        for key, what in ((lambda r: r.lora_int_id, "lora_int_id"), (lambda r: r.lora_name, "lora_name")):
            seen = [key(request) for request, _ in entries]
            twice = next((value for value in seen if seen.count(value) > 1), None)
            if twice is not None:
                raise ValueError(f"LoRAMix names {what} {twice!r} twice; give each adapter once (weights of the same "
                                 f"adapter add up)")
        object.__setattr__(self, "adapters", tuple(entries))

    @property
    def lora_name(self) -> str:
        """A readable name of the mix, e.g. 'sql*0.7+json*0.3' (outputs and logs)."""
        return "+".join(f"{request.lora_name}*{weight:g}" for request, weight in self.adapters)


# Above this a scale or weight only blows activations up (float32 overflows to inf far earlier in the layers
# than the number itself suggests): a typo, refused rather than served as NaN.
MAX_COEFFICIENT = 1000.0


def _coefficient(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= MAX_COEFFICIENT:
        raise ValueError(f"{what} must be a finite number in [0, {MAX_COEFFICIENT:g}], got {value!r}")
    return float(value)
