"""Engine configuration: dataclasses validated once, at the edge; inner code trusts them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# bf16 must beat fp32 by this much on the probe before "auto" gives up fp32's accuracy for it.
_BF16_MIN_SPEEDUP = 1.5


@cache
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a decode-sized matmul ([64, 576] x [576, 1536]), measured once per process.

    CPU flags do not predict it: an Intel Xeon with avx512_bf16 but no AMX ran PyTorch's bf16 matmuls at
    half its fp32 speed, an AMD EPYC with the same flag at 4x (docs/benchmarks.md). Best of several runs,
    so a busy core does not flip the answer; the probe costs well under a second."""
    def best_time(dtype: torch.dtype) -> float:
        x, w = torch.randn(64, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        times = []
        for _ in range(12):
            start = time.perf_counter()
            for _ in range(4):
                F.linear(x, w)
            times.append(time.perf_counter() - start)
        return min(times[2:])
    return best_time(torch.float32) / best_time(torch.bfloat16)


def default_dtype(device: str) -> torch.dtype:
    """'auto': bfloat16 on CUDA, and on a CPU where bf16 matmuls are clearly faster than fp32 (AMX, or an
    avx512_bf16 that runs at full rate); float32 elsewhere, where bf16 would only cost accuracy."""
    if device.startswith("cuda"):
        return torch.bfloat16
    if torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    speedup = cpu_bf16_speedup()
    dtype = torch.bfloat16 if speedup >= _BF16_MIN_SPEEDUP else torch.float32
    logger.info("dtype auto: bf16 matmuls run %.1fx fp32's speed on this CPU; using %s", speedup, dtype)
    return dtype


def parse_dtype(name: str | torch.dtype, *, auto: torch.dtype, what: str) -> torch.dtype:
    """'auto' | 'bfloat16' | 'float16' | 'float32' | torch.dtype -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass
class LoRAConfig:
    """Adapter capacity. Slots (max_loras) live beside the model; host copies (max_cpu_loras) in RAM."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max_loras
    lora_dtype: str | torch.dtype = "auto"

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )


@dataclass
class EngineConfig:
    """Everything the engine needs to start. `model=None` selects the default model."""

    model: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512  # per-step token budget; long prompts are prefilled in chunks
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: sized from kv_cache_memory_gb / free memory
    kv_cache_memory_gb: float | None = None
    seed: int = 0
    enable_lora: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        self.torch_dtype = parse_dtype(self.dtype, auto=default_dtype(self.device), what="dtype")
        self.lora_torch_dtype = parse_dtype(self.lora.lora_dtype, auto=self.torch_dtype, what="lora_dtype")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
