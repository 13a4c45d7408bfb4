"""The base matmul of a linear layer, y = x Wᵀ + b, with W held in the form the fastest kernel on this device
takes. All forms compute what F.linear computes (tests/test_matmul.py checks each against it):

- bf16 / fp16 on CPU: oneDNN's prepacked weight (`mkldnn._reorder_linear_weight`), bit-identical to F.linear
  and 10-30 % faster at every batch size here (docs/benchmarks.md); the dense copy is dropped.
- fp32 on CPU: MKL's prepacked weight, bit-identical, ~7 % faster (MKL also wants the dense weight).
- elsewhere: the dense weight and F.linear.
"""
from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

# Batch size the packed layouts are tuned for; any batch size computes the same result.
PACK_BATCH_HINT = 64


class MatmulWeight:
    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype, self.device = weight.dtype, weight.device
        self.kind = _kind(weight)
        self.dense: torch.Tensor | None = weight
        self.packed: torch.Tensor | None = None
        if self.kind == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_BATCH_HINT)
        elif self.kind == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            self.dense = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        if self.kind == "mkl":
            return torch.ops.mkl._mkl_linear(x, self.packed, self.dense, bias, PACK_BATCH_HINT)
        return F.linear(x, self.dense, bias)

    @property
    def nbytes(self) -> int:
        """Bytes of weight this holds (a prepacked copy counts as its dense size)."""
        copies = (self.dense is not None) + (self.packed is not None)
        return copies * self.out_features * self.in_features * self.dtype.itemsize


def _kind(weight: torch.Tensor) -> str:
    if weight.device.type != "cpu":
        return "dense"
    if weight.dtype == torch.float32:
        return "mkl" if torch.backends.mkl.is_available() else "dense"
    if weight.dtype in (torch.bfloat16, torch.float16) and _onednn_supports(weight.dtype):
        return "onednn"
    return "dense"


@cache
def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs prepacked `dtype` linears on this CPU (fp16 needs hardware support)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None, "none", [], "")
        return bool((out == 8).all())
    except RuntimeError:
        return False
