"""Attention over the paged KV cache.

The cache of one layer is [num_blocks, block_size, kv_heads, head_dim] for K and for V. A token's K/V sits
in its flat slot (block * block_size + offset). The flat batch holds prefill chunks first (each a
run of tokens of one sequence), then one token per decoding sequence, which are attended together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.layers.cpu_kernels import cpu_kernel, paged_attention_module
from loraserve.layers.forward_batch import AttentionMetadata, PrefillSpan


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] into the paged caches at their flat slots."""
    num_kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class PagedAttention:
    """Stateless: the caches are passed in by the layer that owns them.

    `window`: a token attends only to the last `window` positions (itself included), as a sliding-window
    layer does; `softcap`: scores become softcap * tanh(scores / softcap) before the softmax (Gemma 2).
    Either takes the PyTorch path (explicit scores or masks); plain attention uses SDPA and the CPU kernel."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None = None,
                 softcap: float | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window
        self.softcap = softcap

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
            keys, values = k[span.start:span.end], v[span.start:span.end]
        else:
            keys = k_cache[span.block_ids].flatten(0, 1)[:span.context_len]
            values = v_cache[span.block_ids].flatten(0, 1)[:span.context_len]
        mask = None
        if not span.fresh or self.window is not None or self.softcap is not None:
            n = span.end - span.start
            keys_at = torch.arange(span.context_len, device=q.device)[None, :]
            query_at = torch.arange(n, device=q.device)[:, None] + (span.context_len - n)
            mask = keys_at <= query_at
            if self.window is not None:
                mask &= keys_at > query_at - self.window
        out = self._attend(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), mask)
        return out.transpose(0, 1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """q [.., H, n, D] over keys/values [.., KVH, L, D]; mask broadcasts to [.., H, n, L] (None: causal)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        group = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(group, dim=-3), values.repeat_interleave(group, dim=-3)
        scores = (q @ keys.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        plain = self.window is None and self.softcap is None
        kernel = cpu_kernel(paged_attention_module, q, k_cache, any_dtype=True) if plain else None
        if kernel is not None:
            return kernel.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                 meta.decode_context_lens, self.scale)
        tables = meta.decode_block_tables
        keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
        values = v_cache[tables].flatten(1, 2).transpose(1, 2)
        mask = meta.decode_mask
        if self.window is not None:
            mask = mask & meta.decode_window_mask(self.window)
        return self._attend(q[:, :, None, :], keys, values, mask)[:, :, 0, :]
