"""The generic decoder, driven by a DecoderSpec: Llama (SmolLM2, Llama-3), Mistral, Mixtral, Qwen2,
Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma, Gemma 2, Gemma 3, Phi-3, GLM, GLM-4, Baichuan 7B and ChatGLM2/3 differ only in
flags of the spec.
Module paths mirror Hugging Face's so checkpoint and adapter names map onto them; q/k/v and gate/up are
packed into one matmul each."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from loraserve.layers.activation import GatedActivation
from loraserve.layers.attention import PagedAttention
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear
from loraserve.layers.moe import FusedExperts, route
from loraserve.layers.norm import RMSNorm
from loraserve.layers.rotary import RotaryEmbedding, rotate_and_store
from loraserve.model.causal_lm import CausalLM
from loraserve.model.registry import DecoderSpec

Rotary = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, window: int | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        parts = {spec.packed_qkv: q + 2 * kv} if spec.packed_qkv else {"q_proj": q, "k_proj": kv, "v_proj": kv}
        self.qkv_proj = Linear(spec.hidden_size, parts, bias=spec.qkv_bias)
        self.o_proj = Linear(q, {spec.part_name("o_proj"): spec.hidden_size}, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)
        self.qk_norm = spec.qk_norm
        self.rope_interleaved = spec.rope_interleaved
        self.attn = PagedAttention(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_scale,
                                   window=window, softcap=spec.attention_softcap)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, rotary: Rotary, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x, batch.lora)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q, batch.lora), self.k_norm(k, batch.lora)
        q, k = rotate_and_store(q, k, v, *rotary, self.k_cache, self.v_cache, batch.attention.slot_mapping,
                                interleaved=self.rope_interleaved)
        out = self.attn(q, k, v, self.k_cache, self.v_cache, batch.attention)
        return self.o_proj(out, batch.lora)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, size: int) -> None:
        super().__init__()
        gate_up = spec.part_name("gate_up_proj")
        parts = {gate_up: 2 * size} if spec.packed_gate_up else {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = Linear(spec.hidden_size, parts, bias=spec.mlp_bias)
        self.down_proj = Linear(size, {spec.part_name("down_proj"): spec.hidden_size}, bias=spec.mlp_bias)
        self.act = GatedActivation(spec.activation)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x, batch.lora)), batch.lora)


class SparseMoeBlock(nn.Module):
    """Routed experts (layers/moe.py), plus Qwen2-MoE's shared expert gated by sigmoid(shared_expert_gate)."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        moe = spec.moe
        self.top_k, self.normalize = moe.top_k, moe.normalize_top_k
        self.gate = Linear(spec.hidden_size, {"gate": moe.num_experts})
        self.experts = FusedExperts(moe.num_experts, spec.hidden_size, moe.intermediate_size, spec.activation)
        self.shared_expert = MLP(spec, moe.shared_expert_size) if moe.shared_expert_size else None
        if self.shared_expert is not None:
            self.shared_expert_gate = Linear(spec.hidden_size, {"shared_expert_gate": 1})

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        ids, weights = route(self.gate(x, batch.lora), self.top_k, self.normalize)
        out = self.experts(x, ids, weights, batch.lora)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x, batch.lora)) * self.shared_expert(x, batch)
        return out


class DecoderLayer(nn.Module):
    # (before attention, after it, before the MLP, after it); None: that norm is absent
    PLAIN_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)

    def __init__(self, spec: DecoderSpec, index: int, max_positions: int) -> None:
        super().__init__()
        window = spec.layer_window(index)
        self.self_attn = Attention(spec, window if window is not None and window < max_positions else None)
        routed = spec.moe is not None and index in spec.moe.layers
        self.mlp = SparseMoeBlock(spec) if routed else MLP(spec, spec.intermediate_size)
        self.norm_names = spec.sandwich_norms or self.PLAIN_NORMS
        for name in self.norm_names:
            if name is not None:
                setattr(self, name, RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset))

    def _norm(self, role: int) -> RMSNorm | None:
        name = self.norm_names[role]
        return None if name is None else getattr(self, name)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotary: Rotary,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at the first layer); residual: the stream it
        is added to (None at the first layer). Returns this layer's MLP output and the stream, so each add
        is fused with the norm after it; the sums are the ones `x + attn(norm(x))` ... computes."""
        before_attention, after_attention, before_mlp, after_mlp = (self._norm(role) for role in range(4))
        if residual is None:
            residual, h = x, before_attention(x, batch.lora)
        else:
            h, residual = before_attention.add_and_norm(x, residual, batch.lora)
        h = self.self_attn(h, rotary, batch)
        if after_attention is not None:
            h = after_attention(h, batch.lora)
        h, residual = before_mlp.add_and_norm(h, residual, batch.lora)
        h = self.mlp(h, batch)
        return (h if after_mlp is None else after_mlp(h, batch.lora)), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, max_positions) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)


class DecoderForCausalLM(CausalLM):
    def __init__(self, spec: DecoderSpec, config: PretrainedConfig, max_positions: int,
                 rope_factors: tuple[float, ...] = (1.0,)) -> None:
        super().__init__(spec)
        self.model = DecoderModel(spec, max_positions)
        # one table per distinct rope_parameters: Gemma 3's sliding and full layers rotate differently
        self.rope_keys = list(spec.layer_types) if spec.rope_per_layer_type else ["default"] * spec.num_layers
        self.rotary = nn.ModuleDict({
            key: RotaryEmbedding(config, spec.head_dim, max_positions, None if key == "default" else key,
                                 rope_factors)
            for key in dict.fromkeys(self.rope_keys)})
        self._make_lm_head()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def long_rope_after(self) -> int | None:
        """longrope (Phi-3): a sequence longer than this rotates with the long factors."""
        return next((table.long_after for table in self.rotary.values() if table.long_after is not None), None)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed(batch)
        if self.spec.embed_scale is not None:
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        rotary = {key: table.lookup(batch.positions, h.dtype, batch.rope_factors)
                  for key, table in self.rotary.items()}
        residual = None
        for layer, key in zip(self.model.layers, self.rope_keys, strict=True):
            h, residual = layer(h, residual, rotary[key], batch)
        rows = batch.logits_indices
        h, _ = self.model.norm.add_and_norm(h[rows], residual[rows], batch.logits_lora)
        return self.logits(h, batch)
