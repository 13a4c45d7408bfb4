"""Routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE): a top-k router and a stack of gated-MLP experts, held as
the fused [experts, out, in] tensors transformers uses, each optionally with per-adapter LoRA per expert.

Tokens are grouped, not looped over: every (token, chosen expert) pair is sorted by expert (and, within an
expert, by lane: the adapters a token applies), each expert runs one matmul over its contiguous rows, and each
(expert, lane) group adds its LoRA terms in the same kernel call as all the others. The loop is over the experts
(and the lanes present), never over tokens.

Experts may be held quantized (a GPTQ / AWQ / compressed-tensors / GGUF checkpoint's per-expert modules, or
int8 / int4 at load): each expert's gate/up and down then compute with QuantizedMatmul, as a Linear would, and
the fused float tensors are never allocated. LoRA is added on top either way.

Expert LoRA follows PEFT's `target_parameters` on the fused tensors (lora.ParamWrapper): for expert e the
weight becomes W[e] + scale · B_e A_e, with A_e = lora_A[e·r:(e+1)·r] and B_e = lora_B[:, e::experts]
(lora/adapter.py unpacks that layout into [experts, r, in] / [experts, out, r]).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.layers.activation import GatedActivation
from loraserve.layers.forward_batch import LoRABatch, LoRASegment
from loraserve.layers.lora_ops import SlotLayout, add_lora_groups
from loraserve.layers.quantized import QuantizedMatmul, QuantizedTensor

# checkpoint spellings of one expert's matrices -> (fused tensor, which half of gate_up or None)
EXPERT_PARTS = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
                "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


class FusedExperts(nn.Module):
    """gate_up_proj [experts, 2 * intermediate, hidden] (gate rows first), down_proj [experts, hidden,
    intermediate]: transformers' fused layout, which per-expert checkpoints (w1/w3/w2 or gate/up/down_proj)
    are copied into."""

    TENSORS = ("gate_up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        # allocated when the first float weight arrives, so quantized experts never hold a float copy
        self.gate_up_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        self.fused_shapes = {"gate_up_proj": (num_experts, 2 * intermediate_size, hidden_size),
                             "down_proj": (num_experts, hidden_size, intermediate_size)}
        self.act = GatedActivation(activation)
        self.lora: dict[str, SlotLayout] = {}  # set by enable_lora, one per fused tensor
        self.loaded: set[tuple[int, str]] = set()  # (expert, checkpoint part) copied from per-expert tensors
        # quantized experts: (fused tensor, expert) -> its parts by row offset, until pack() makes the matmuls
        self.quantized: dict[tuple[str, int], dict[int, QuantizedTensor]] = {}
        self.matmuls: dict[str, list[QuantizedMatmul]] = {}

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """Fused tensor name -> (experts, in_features, out_features)."""
        return {name: (experts, fan_in, fan_out) for name, (experts, fan_out, fan_in) in self.fused_shapes.items()}

    def enable_lora(self, num_slots: int, max_rank: int, dtype: torch.dtype) -> dict[str, SlotLayout]:
        self.lora = {name: SlotLayout.allocate({name: fan_out}, fan_in, num_slots, max_rank, dtype,
                                               self.gate_up_proj.device, experts=experts)
                     for name, (experts, fan_in, fan_out) in self.shapes().items()}
        return self.lora

    def load_expert(self, expert: int, part: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        """Copy one expert's checkpoint matrix (a key of EXPERT_PARTS) into the fused tensors, or keep it
        quantized."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, the config says {self.num_experts} experts")
        name, half = EXPERT_PARTS[part]
        _, fan_out, fan_in = self.fused_shapes[name]
        rows = slice(0, fan_out) if half is None else slice(half * self.intermediate_size,
                                                            (half + 1) * self.intermediate_size)
        expected = (rows.stop - rows.start, fan_in)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expert {expert} {part}: checkpoint shape {tuple(tensor.shape)}, model expects "
                             f"{expected}")
        if isinstance(tensor, QuantizedTensor):
            self.quantized.setdefault((name, expert), {})[rows.start] = tensor.to(self.device)
        else:
            self._fused(name)[expert][rows].copy_(tensor)
        self.loaded.add((expert, "gate" if half == 0 else "up" if half == 1 else "down"))

    def load_fused(self, name: str, tensor: torch.Tensor,
                   quantize: Callable[[torch.Tensor], QuantizedTensor] | None = None) -> None:
        """A fused tensor as transformers names it ([experts, out, in]); `quantize`: a quantizer applied
        expert by expert (int8 / int4 at load), so no float copy is kept."""
        if tuple(tensor.shape) != self.fused_shapes[name]:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {self.fused_shapes[name]}")
        if quantize is None:
            self._fused(name).copy_(tensor)
            return
        for expert in range(self.num_experts):
            self.quantized[(name, expert)] = {0: quantize(tensor[expert]).to(self.device)}

    def _fused(self, name: str) -> torch.Tensor:
        param = getattr(self, name)
        if param.numel() == 0:
            param.data = torch.empty(self.fused_shapes[name], dtype=param.dtype, device=param.device)
        return param.data

    def pack(self) -> None:
        """Quantized experts get their matmuls and the fused float tensors are let go; float ones stay."""
        if not self.quantized:
            return
        covered = {key: sum(t.rows for t in parts.values()) for key, parts in self.quantized.items()}
        missing = [f"expert {e} {name}" for name in self.TENSORS for e in range(self.num_experts)
                   if covered.get((name, e)) != self.fused_shapes[name][1]]
        missing += [name for name in self.TENSORS if getattr(self, name).numel()]  # float beside quantized
        if missing:
            raise ValueError(f"checkpoint quantizes some expert weights but not {', '.join(missing[:4])}: a "
                             f"layer's experts must all be held the same way")
        for name in self.TENSORS:
            self.matmuls[name] = [QuantizedMatmul([t for _, t in sorted(self.quantized[(name, e)].items())])
                                  for e in range(self.num_experts)]
            getattr(self, name).data = torch.empty(0, dtype=getattr(self, name).dtype, device=self.device)
        self.quantized = {}

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held (quantized ones at their quantized size)."""
        dense = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.TENSORS)
        return dense + sum(m.nbytes for ms in self.matmuls.values() for m in ms)

    def _matmul(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.matmuls:
            return self.matmuls[name][expert](x)
        return F.linear(x, getattr(self, name)[expert])

    def missing_experts(self) -> list[str]:
        """Per-expert parts never loaded, when the checkpoint is per-expert (empty when it was fused)."""
        if not self.loaded:
            return []
        wanted = {(e, p) for e in range(self.num_experts) for p in ("gate", "up", "down")}
        return [f"expert {e} {p}" for e, p in sorted(wanted - self.loaded)]

    def forward(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor,
                lora: LoRABatch | None) -> torch.Tensor:
        """x [T, hidden], top_ids / top_weights [T, k] -> Σ_k weight · expert(x) per token."""
        tokens, top_k = top_ids.shape
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
        experts = top_ids.flatten()
        use_lora = lora is not None and self.lora and any(layout.widths[slot * self.num_experts]
                                                           for layout in self.lora.values()
                                                           for slot in lora.slots_present)
        groups = self.num_experts
        key = experts
        if use_lora:  # within an expert, rows of one lane together (lane -1: none)
            groups = self.num_experts * (len(lora.lanes) + 1)
            key = experts * (len(lora.lanes) + 1) + lora.lane_ids[token_of] + 1
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=groups).tolist()
        rows = x[token_of[order]]
        gate_up = torch.empty(rows.shape[0], self.fused_shapes["gate_up_proj"][1], dtype=x.dtype, device=x.device)
        bounds = self._expert_bounds(counts, groups // self.num_experts)
        for expert, (start, end) in enumerate(bounds):
            if end > start:
                gate_up[start:end] = self._matmul("gate_up_proj", expert, rows[start:end])
        if use_lora:  # the same (slot, expert, rows) groups serve both tensors
            lora_groups = self._lora_groups(counts, lora)
            add_lora_groups(gate_up, rows, self.lora["gate_up_proj"], lora_groups)
        hidden = self.act(gate_up)
        out = torch.empty_like(rows)
        for expert, (start, end) in enumerate(bounds):
            if end > start:
                out[start:end] = self._matmul("down_proj", expert, hidden[start:end])
        if use_lora:
            add_lora_groups(out, hidden, self.lora["down_proj"], lora_groups)
        out *= top_weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of[order], out)

    @staticmethod
    def _expert_bounds(counts: list[int], per_expert: int) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for expert_start in range(0, len(counts), per_expert):
            end = start + sum(counts[expert_start:expert_start + per_expert])
            bounds.append((start, end))
            start = end
        return bounds

    def _lora_groups(self, counts: list[int], lora: LoRABatch) -> list[LoRASegment]:
        """The runs of every lane's rows within each expert's rows, one per adapter of the lane, on virtual
        slots slot·experts + expert (lane -1 skipped)."""
        groups, start, per_expert = [], 0, len(lora.lanes) + 1
        for group, count in enumerate(counts):
            lane = group % per_expert - 1
            if count and lane >= 0:
                expert = group // per_expert
                groups += [LoRASegment(slot * self.num_experts + expert, start, start + count, coef)
                           for slot, coef in lora.lanes[lane]]
            start += count
        return groups


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing from the router's logits [T, experts]: softmax in float32, the k most probable experts,
    their probabilities renormalised to sum to one when `normalize`. Returns (ids, weights), each [T, k]."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights
