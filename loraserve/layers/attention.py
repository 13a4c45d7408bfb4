"""Attention over the paged KV cache.

The cache of one layer is [num_blocks, block_size, kv_heads, head_dim] for K and for V. A token's K/V sits
in its flat slot (block * block_size + offset). The flat batch holds prefill chunks first (each a
run of tokens of one sequence), then one token per decoding sequence, which are attended together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.layers.cpu_kernels import paged_attention_module
from loraserve.layers.forward_batch import AttentionMetadata, PrefillSpan


class PagedAttention:
    """Stateless: the caches are passed in by the layer that owns them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> [T, H * D]; k and v are already in the caches
        (rotary.rotate_and_store wrote them)."""
        out = torch.empty_like(q)
        for span in meta.prefills:
            out[span.start:span.end] = self._prefill(q[span.start:span.end], k, v, k_cache, v_cache, span)
        if meta.decode_block_tables is not None:
            out[meta.decode_start:] = self._decode(q[meta.decode_start:], k_cache, v_cache, meta)
        return out.flatten(1)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
        if span.fresh:
            keys, values, mask = k[span.start:span.end], v[span.start:span.end], None
        else:
            keys = k_cache[span.block_ids].flatten(0, 1)[:span.context_len]
            values = v_cache[span.block_ids].flatten(0, 1)[:span.context_len]
            n = span.end - span.start
            offset = span.context_len - n
            mask = (torch.arange(span.context_len, device=q.device)[None, :]
                    <= torch.arange(n, device=q.device)[:, None] + offset)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
            is_causal=mask is None, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(0, 1)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        kernel = paged_attention_module() if q.device.type == "cpu" else None
        if kernel is not None:
            return kernel.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                 meta.decode_context_lens, self.scale)
        tables = meta.decode_block_tables
        keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
        values = v_cache[tables].flatten(1, 2).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=meta.decode_mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return out[:, :, 0, :]
