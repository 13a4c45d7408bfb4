"""RMSNorm in the two numerical flavours of the checkpoints we serve."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises in float32. Llama multiplies by w after casting back; Gemma stores w - 1 and multiplies
    by (1 + w) in float32 before casting (`offset=True`). Matching each order keeps bf16 outputs equal."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)
