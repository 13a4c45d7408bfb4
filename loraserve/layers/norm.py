"""RMSNorm in the two numerical flavours of the checkpoints we serve, alone or fused with the residual add
that precedes it in every decoder layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.cpu_kernels import cpu_kernel, fused_ops_module


class RMSNorm(nn.Module):
    """Normalises in float32. Llama multiplies by w after casting back; Gemma stores w - 1 and multiplies
    by (1 + w) in float32 before casting (`offset=True`). Matching each order keeps bf16 outputs equal."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = cpu_kernel(fused_ops_module, x)
        if kernel is not None:
            return kernel.rms_norm(x, self.weight, self.eps, self.offset, None)
        return self._reference(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x): the residual stream grows by x and goes on normalised. The
        CPU kernel adds into `residual` in place."""
        kernel = cpu_kernel(fused_ops_module, x)
        if kernel is not None and residual.is_contiguous():
            return kernel.rms_norm(x, self.weight, self.eps, self.offset, residual), residual
        residual = residual + x
        return self._reference(residual), residual

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-BigCode), alone or fused with the residual add before it, as
    RMSNorm offers."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self(residual), residual
