"""Optional C++ kernels for the CPU hot path, compiled once with the machine's compiler
(torch.utils.cpp_extension) into loraserve's cache. If compiling fails the engine keeps the pure-PyTorch
path, which gives the same results more slowly. `loraserve prepare` builds them ahead of time."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from functools import cache
from pathlib import Path

import torch

from loraserve.paths import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
# -ffast-math lets the compiler reassociate the dot products into vector trees and vectorise exp (1.4x
# faster decode attention); it is compile-only, so the process's floating-point mode (denormals) is untouched.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# torch's build lock is a file; one left behind by a killed build would make every later start wait.
_STALE_LOCK_SECONDS = 600


def _build_dir(source: Path) -> Path:
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))  # shared by every kernel
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(_CFLAGS).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{source.stem}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    return path


@cache
def _module(stem: str):
    """csrc/<stem>.cpp compiled, or None when disabled (LORASERVE_NO_CPU_KERNELS=1) or not buildable here."""
    if os.environ.get("LORASERVE_NO_CPU_KERNELS") == "1":
        return None
    source = _CSRC / f"{stem}.cpp"
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"loraserve_{stem}", sources=[str(source)], build_directory=str(_build_dir(source)),
                    extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build problem means: use the PyTorch path
        logger.warning("C++ kernel %s unavailable (%s); using the PyTorch path", stem, exc)
        return None


def paged_attention_module():
    return _module("paged_attention")


def lora_module():
    return _module("lora_segments")


def fused_ops_module():
    return _module("fused_ops")


def quant_module():
    return _module("quant_matmul")


def build_all() -> dict[str, bool]:
    """Compile every kernel now (for `loraserve prepare`); name -> built."""
    return {"paged attention": paged_attention_module() is not None, "LoRA runs": lora_module() is not None,
            "fused ops": fused_ops_module() is not None, "quantized matmul": quant_module() is not None}


def cpu_kernel(module, *tensors: torch.Tensor, any_dtype: bool = False):
    """The one chooser between a C++ kernel and the PyTorch path: `module()` when every tensor is on the CPU
    in one dtype, bfloat16 unless `any_dtype` (kernels written for every float dtype: LoRA runs, paged
    attention), else None (and None when the kernel did not build). The fused bf16 kernels serve the speed
    path; float32 is the accuracy path and stays on PyTorch's own ops, the reference every parity test is held
    to (fused, float32's sums would be reordered: harmless, but enough to move logits by 1e-4 over 30 layers)."""
    dtype = tensors[0].dtype
    if any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return None
    if not any_dtype and dtype != torch.bfloat16:
        return None
    return module()
