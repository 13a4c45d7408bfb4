"""Questions about the machine, answered once when the engine starts (never when a config is built)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import time
from functools import cache

import torch
import torch.nn.functional as F

from loraserve.config import EngineConfig, parse_dtype

logger = logging.getLogger(__name__)

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


def spare_cores(device: str) -> bool:
    """Whether a thread beside the step runs without taking a core from it: on an accelerator the step
    mostly waits; on a CPU only if its compute threads leave a core free."""
    if not device.startswith("cpu"):
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores > torch.get_num_threads()


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


def resolve_dtypes(config: EngineConfig) -> tuple[torch.dtype, torch.dtype]:
    """(model dtype, adapter dtype); 'auto' probes the machine only when it is asked for."""
    auto = default_dtype(config.device) if config.dtype == "auto" else torch.float32
    dtype = parse_dtype(config.dtype, auto=auto, what="dtype")
    return dtype, parse_dtype(config.lora.lora_dtype, auto=dtype, what="lora_dtype")


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak, the best the OS says)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps the pages of freed small and medium blocks (every
    checkpoint tensor read and dropped while loading leaves some) in its arenas, where they count as resident
    until malloc_trim returns them; a no-op where the C library has no malloc_trim."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)
