"""Optional C++ kernels for the CPU hot path, compiled once with the machine's compiler
(torch.utils.cpp_extension) into loraserve's cache. If compiling fails the engine keeps the pure-PyTorch
path, which gives the same results more slowly. `loraserve prepare` builds them ahead of time."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from loraserve.paths import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
# -ffast-math lets the compiler reassociate the dot products into vector trees and vectorise exp (1.4x
# faster decode attention); it is compile-only, so the process's floating-point mode (denormals) is untouched.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _build_dir(source: Path) -> Path:
    headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))  # shared by every kernel
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(_CFLAGS).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{source.stem}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _building(path: Path) -> Iterator[None]:
    """One build of a kernel at a time across processes, under an OS file lock, which dies with its holder.
    torch's own build lock is a file that a killed build leaves behind, and every later start would wait on it
    forever: holding our lock, nobody else is building, so such a file is stale and goes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(path / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (path / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@cache
def _module(stem: str):
    """csrc/<stem>.cpp compiled, or None when disabled (LORASERVE_NO_CPU_KERNELS=1) or not buildable here."""
    if os.environ.get("LORASERVE_NO_CPU_KERNELS") == "1":
        return None
    source = _CSRC / f"{stem}.cpp"
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir(source)
        with _building(build):
            return load(name=f"loraserve_{stem}", sources=[str(source)], build_directory=str(build),
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
    for t in tensors:  # a plain loop on is_cpu: this runs for every layer of every step
        if not t.is_cpu or t.dtype != dtype:
            return None
    if not any_dtype and dtype != torch.bfloat16:
        return None
    return module()
