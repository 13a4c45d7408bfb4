"""The adapter a request asks for."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Names an adapter: `lora_int_id` (> 0) is its identity in caches, `lora_path` a local
    PEFT folder or a hub id found in the local Hugging Face cache."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id}")
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must be a non-empty path or hub id")
