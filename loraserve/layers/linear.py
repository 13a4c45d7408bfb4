"""Linear layer that may pack several checkpoint matrices (q/k/v, gate/up) into one matmul and may carry
LoRA slots that add a per-token adapter term to its output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.forward_batch import LoRABatch
from loraserve.layers.lora_ops import SlotLayout, add_lora

# Decode batch size the packed layout is tuned for; any batch size computes the same result.
_PACK_BATCH_HINT = 64


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """MKL's prepacked copy of a float32 CPU weight: the same results as F.linear, about a quarter faster
    for decode-sized batches (docs/benchmarks.md). None where it does not apply (other dtypes, devices)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return None
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, _PACK_BATCH_HINT)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          packed: torch.Tensor | None) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, _PACK_BATCH_HINT)


class Linear(nn.Module):
    """y = x Wᵀ + b, where W stacks the checkpoint's `parts` (name -> out features) row-wise.

    `parts` names are the checkpoint's leaf module names (e.g. q_proj, k_proj, v_proj for a packed qkv),
    so weights and adapters written for the unpacked modules map onto slices of this one matmul.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = dict(parts)
        self.out_features = sum(parts.values())
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.lora: SlotLayout | None = None  # set by enable_lora
        self.packed: torch.Tensor | None = None  # set by pack(), after the weights are final

    def enable_lora(self, num_slots: int, max_rank: int, dtype: torch.dtype) -> SlotLayout:
        """Give the layer adapter slots (zero: no adapter changes anything until a slot is filled)."""
        self.lora = SlotLayout.allocate(self.parts, self.in_features, num_slots, max_rank, dtype, self.weight.device)
        return self.lora

    def pack(self) -> None:
        self.packed = pack_weight(self.weight.data)

    def part_slice(self, part: str) -> slice:
        start = 0
        for name, size in self.parts.items():
            if name == part:
                return slice(start, start + size)
            start += size
        raise KeyError(part)

    def load_part(self, part: str, param: str, tensor: torch.Tensor) -> None:
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {param} for {part}, but the model config says it has none")
        rows = self.part_slice(part)
        expected = target[rows].shape
        if tensor.shape != expected:
            raise ValueError(f"{part}.{param}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(expected)}")
        target.data[rows].copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        y = dense(x, self.weight, self.bias, self.packed)
        if self.lora is not None and lora is not None:
            add_lora(y, x, self.lora, lora)
        return y
