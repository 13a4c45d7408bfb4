"""One step's worth of work for the model, built by the model runner and passed explicitly to forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.attention import AttentionMetadata
from loraserve.lora.ops import LoRABatch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] flat tokens of all scheduled sequences
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the flat batch whose next token is sampled
    lora: LoRABatch | None = None  # per-token adapter slots; None when no token uses an adapter
