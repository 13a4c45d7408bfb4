"""Gated MLP activations by their Hugging Face config names: act(gate) * up of a packed gate_up."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loraserve.layers.cpu_kernels import cpu_kernel, fused_ops_module

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}
# The activations the fused CPU kernel computes, by the kernel's name for them.
_FUSED = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
          "gelu_new": "gelu_tanh"}


class GatedActivation:
    """act(gate) * up for a packed [.., 2*I] gate_up projection; one fused pass on CPU."""

    def __init__(self, name: str) -> None:
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[name]
        self.fused = _FUSED.get(name)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        kernel = cpu_kernel(fused_ops_module, gate_up) if self.fused is not None else None
        if kernel is not None:
            return kernel.gated_activation(gate_up, self.fused)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


class Activation:
    """A plain (ungated) activation by its Hugging Face config name (GPT-BigCode's MLP)."""

    def __init__(self, name: str) -> None:
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)
