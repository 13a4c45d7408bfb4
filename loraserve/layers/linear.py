"""Linear layer that may pack several checkpoint matrices (q/k/v, gate/up) into one matmul, may hold them
quantized, and may carry LoRA slots that add a per-token adapter term to its output."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.forward_batch import LoRABatch
from loraserve.layers.lora_ops import SlotLayout, add_lora
from loraserve.layers.matmul import MatmulWeight
from loraserve.layers.quantized import QuantizedMatmul, QuantizedTensor


class Linear(nn.Module):
    """y = x Wᵀ + b, where W stacks the checkpoint's `parts` (name -> out features) row-wise.

    `parts` names are the checkpoint's leaf module names (e.g. q_proj, k_proj, v_proj for a packed qkv),
    so weights and adapters written for the unpacked modules map onto slices of this one matmul. A part may
    arrive quantized (a QuantizedTensor from a GPTQ / AWQ / compressed-tensors / GGUF checkpoint); then every
    part must, and the dense weight is never allocated.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = dict(parts)
        self.out_features = sum(parts.values())
        # allocated when the first dense part arrives, so a quantized checkpoint never holds a dense copy
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.quantized: dict[str, QuantizedTensor] = {}
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.lora: SlotLayout | None = None  # set by enable_lora
        self.matmul: MatmulWeight | QuantizedMatmul | None = None  # set by pack(), after the weights are final
        # ‖W row‖² in float32, kept by pack() (the packed forms drop the dense weight) for DoRA's norms
        self.row_norms_sq = torch.empty(0)

    def enable_lora(self, num_slots: int, max_rank: int, dtype: torch.dtype) -> SlotLayout:
        """Give the layer adapter slots (zero: no adapter changes anything until a slot is filled)."""
        self.lora = SlotLayout.allocate(self.parts, self.in_features, num_slots, max_rank, dtype, self.weight.device)
        return self.lora

    def pack(self) -> None:
        """Hand the final weight to the fastest matmul form; the dense parameter keeps only what that form
        does not copy (nothing, for oneDNN's bf16 layout or a quantized weight)."""
        if self.quantized:
            missing = [p for p in self.parts if p not in self.quantized]
            if missing or self.weight.numel():
                raise ValueError(f"checkpoint quantizes {', '.join(self.quantized)} but not {', '.join(missing)}: "
                                 f"parts packed into one matmul must all be quantized the same way")
            self.row_norms_sq = torch.cat([self.quantized[p].dequantize(torch.float32).pow(2).sum(dim=1)
                                           for p in self.parts])
            self.matmul = QuantizedMatmul([self.quantized[p] for p in self.parts])
            self.quantized = {}
            return
        self.row_norms_sq = self.weight.data.float().pow(2).sum(dim=1)
        self.matmul = MatmulWeight(self.weight.data)
        if self.matmul.dense is None:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    @property
    def nbytes(self) -> int:
        """Bytes of weight and bias this layer holds."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        held = self.matmul.nbytes if self.matmul is not None else self.weight.numel() * self.weight.element_size()
        return bias + held

    def part_slice(self, part: str) -> slice:
        start = 0
        for name, size in self.parts.items():
            if name == part:
                return slice(start, start + size)
            start += size
        raise KeyError(part)

    def load_part(self, part: str, param: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        rows = self.part_slice(part)
        if isinstance(tensor, QuantizedTensor):
            expected = (rows.stop - rows.start, self.in_features)
            if param != "weight" or tensor.shape != expected:
                raise ValueError(f"{part}.{param}: quantized checkpoint shape {tensor.shape}, model expects {expected}")
            self.quantized[part] = tensor.to(self.weight.device)
            return
        if param == "weight" and self.weight.numel() == 0:
            self.weight.data = torch.empty(self.out_features, self.in_features, dtype=self.weight.dtype,
                                           device=self.weight.device)
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {param} for {part}, but the model config says it has none")
        expected = target[rows].shape
        if tensor.shape != expected:
            raise ValueError(f"{part}.{param}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(expected)}")
        target.data[rows].copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        y = self.matmul(x, self.bias) if self.matmul is not None else F.linear(x, self.weight, self.bias)
        if self.lora is not None and lora is not None:
            add_lora(y, x, self.lora, lora)
        return y
