"""RMSNorm in the two numerical flavours of the checkpoints we serve, alone or fused with the residual add
that precedes it in every decoder layer; and LayerNorm. An adapter may bring its own norm weights
(modules_to_save, bias='all'): `slot_params` holds them per adapter slot, applied to that slot's tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.cpu_kernels import cpu_kernel, fused_ops_module
from loraserve.layers.forward_batch import LoRABatch


class SlotNorm(nn.Module):
    """What both norms share: per-slot parameters recomputed over their slot's rows after the shared pass."""

    def __init__(self) -> None:
        super().__init__()
        self.slot_params: dict[int, dict[str, torch.Tensor]] = {}  # slot -> parameter name -> the adapter's

    def _reference(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _per_slot(self, y: torch.Tensor, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        """y with the rows of slots that have their own parameters normalised from x again with those."""
        if lora is None or not self.slot_params:
            return y
        for run in lora.segments + lora.decode_runs:
            params = self.slot_params.get(run.slot)
            if params:
                y[run.start:run.end] = self._reference(x[run.start:run.end], params)
        return y

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        raise NotImplementedError


class RMSNorm(SlotNorm):
    """Normalises in float32. Llama multiplies by w after casting back; Gemma stores w - 1 and multiplies
    by (1 + w) in float32 before casting (`offset=True`). Matching each order keeps bf16 outputs equal."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        kernel = cpu_kernel(fused_ops_module, x)
        if kernel is not None:
            return self._per_slot(kernel.rms_norm(x, self.weight, self.eps, self.offset, None), x, lora)
        return self._per_slot(self._reference(x, {}), x, lora)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor,
                     lora: LoRABatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x): the residual stream grows by x and goes on normalised. The
        CPU kernel adds into `residual` in place."""
        kernel = cpu_kernel(fused_ops_module, x)
        if kernel is not None and residual.is_contiguous():
            y = kernel.rms_norm(x, self.weight, self.eps, self.offset, residual)
        else:
            residual = residual + x
            y = self._reference(residual, {})
        return self._per_slot(y, residual, lora), residual

    def _reference(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        weight = params.get("weight", self.weight)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + weight.float())).to(dtype)
        return weight.to(dtype) * h.to(dtype)


class LayerNorm(SlotNorm):
    """LayerNorm with weight and bias (GPT-BigCode), alone or fused with the residual add before it, as
    RMSNorm offers."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        return self._per_slot(self._reference(x, {}), x, lora)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor,
                     lora: LoRABatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self(residual, lora), residual

    def _reference(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        weight, bias = params.get("weight", self.weight), params.get("bias", self.bias)
        return F.layer_norm(x, self.weight.shape, weight.to(x.dtype), bias.to(x.dtype), self.eps)
