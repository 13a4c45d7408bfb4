"""The adapter a request asks for, in vLLM's shape. It sits at the bottom floor because requests and their
outputs (RequestOutput.lora_request) carry it through every layer."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoRARequest:
    """Names an adapter: `lora_int_id` (> 0) is its identity in the engine's caches and must always name the
    same adapter; `lora_path` is a local PEFT folder or a hub id found in the local Hugging Face cache.

    `lora_local_path` is vLLM's deprecated spelling of `lora_path`: accepted with a warning, giving the same
    object (it takes no part in equality or hashing)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    lora_local_path: str | None = field(default=None, compare=False, repr=False)

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
