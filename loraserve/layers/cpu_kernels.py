"""Optional C++ kernels for the CPU hot path, compiled once on first use with the machine's compiler
(torch.utils.cpp_extension; cached under ~/.cache/torch_extensions). If compiling fails the engine keeps
the pure-PyTorch path, which gives the same results more slowly."""
from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"


@cache
def paged_attention_module():
    """The compiled module, or None when disabled (LORASERVE_NO_CPU_KERNELS=1) or not buildable here."""
    if os.environ.get("LORASERVE_NO_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="loraserve_paged_attention", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build problem means: use the PyTorch path
        logger.warning("C++ paged attention unavailable (%s); using the PyTorch path", exc)
        return None
