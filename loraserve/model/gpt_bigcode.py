"""GPT-BigCode (StarCoder, SantaCoder): multi-query attention from one packed c_attn, learned absolute
positions, LayerNorm with bias, a plain GELU MLP (c_fc / c_proj). Module paths mirror Hugging Face's
(transformer.h.N.attn.c_attn ...), so checkpoint names and PEFT's target names (c_attn, c_proj, c_fc) map
onto them."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from loraserve.layers.activation import Activation
from loraserve.layers.attention import PagedAttention, write_kv
from loraserve.layers.forward_batch import ForwardBatch
from loraserve.layers.linear import Linear
from loraserve.layers.norm import LayerNorm
from loraserve.model.causal_lm import CausalLM
from loraserve.model.registry import DecoderSpec


class BigCodeAttention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.per_head = spec.qkv_per_head
        kv = spec.num_kv_heads * spec.head_dim
        self.c_attn = Linear(spec.hidden_size, {"c_attn": spec.hidden_size + 2 * kv}, bias=True)
        self.c_proj = Linear(spec.hidden_size, {"c_proj": spec.hidden_size}, bias=True)
        self.attn = PagedAttention(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_scale)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.c_attn(x, batch.lora)
        if self.per_head:  # multi-head checkpoints: [q, k, v] of head 0, then of head 1...
            q, k, v = qkv.view(-1, self.num_heads, 3 * self.head_dim).split(self.head_dim, dim=-1)
            k, v = k.contiguous(), v.contiguous()
        else:  # multi-query: all query heads, then the one key head and the one value head
            q_size = self.num_heads * self.head_dim
            q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + self.head_dim].reshape(-1, 1, self.head_dim)
            v = qkv[:, q_size + self.head_dim:].reshape(-1, 1, self.head_dim)
        write_kv(k, v, self.k_cache, self.v_cache, batch.attention.slot_mapping)
        out = self.attn(q.contiguous(), k, v, self.k_cache, self.v_cache, batch.attention)
        return self.c_proj(out, batch.lora)


class BigCodeMLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.c_fc = Linear(spec.hidden_size, {"c_fc": spec.intermediate_size}, bias=True)
        self.c_proj = Linear(spec.intermediate_size, {"c_proj": spec.hidden_size}, bias=True)
        self.act = Activation(spec.activation)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x, batch.lora)), batch.lora)


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = BigCodeAttention(spec)
        self.ln_2 = LayerNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = BigCodeMLP(spec)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """As DecoderLayer.forward: returns the MLP output and the residual stream it is to be added to."""
        if residual is None:
            residual, h = x, self.ln_1(x, batch.lora)
        else:
            h, residual = self.ln_1.add_and_norm(x, residual, batch.lora)
        h, residual = self.ln_2.add_and_norm(self.attn(h, batch), residual, batch.lora)
        return self.mlp(h, batch), residual


class Transformer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.wpe = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)
        for table in (self.wte, self.wpe):
            table.weight.requires_grad_(False)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.ln_f = LayerNorm(spec.hidden_size, spec.rms_norm_eps)


class GPTBigCodeForCausalLM(CausalLM):
    embed_name = "transformer.wte.weight"

    def __init__(self, spec: DecoderSpec, config: PretrainedConfig, max_positions: int,
                 rope_factors: tuple[float, ...] = (1.0,)) -> None:
        if len(rope_factors) > 1:
            raise ValueError("GPT-BigCode has learned absolute positions, no RoPE to scale: long-context LoRA "
                             "(--long-lora-scaling-factors) does not apply to it")
        super().__init__(spec)
        self.transformer = Transformer(spec)
        self._make_lm_head()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.wte

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed(batch) + self.transformer.wpe(batch.positions)
        residual = None
        for block in self.transformer.h:
            h, residual = block(h, residual, batch)
        rows = batch.logits_indices
        h, _ = self.transformer.ln_f.add_and_norm(h[rows], residual[rows], batch.logits_lora)
        return self.logits(h, batch)
