"""Rotary position embedding (neox / Hugging Face "rotate half" layout) from a precomputed table."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraserve.layers.attention import write_kv
from loraserve.layers.cpu_kernels import cpu_kernel, fused_ops_module

# RoPE variants with fixed tables: one for all positions, or Phi-3's longrope, whose two tables (short and long
# factors) a sequence chooses between by its length (RotaryEmbedding.long_after).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_inverse_frequencies(config: PretrainedConfig, head_dim: int,
                             layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq and the cos/sin scale, computed by transformers' own RoPE initialisers so every scaling
    scheme (Llama-3, YaRN, linear) gives exactly the reference frequencies. `layer_type`: the entry of a
    per-layer-type rope_parameters (Gemma 3's sliding / full layers)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    extra = {} if layer_type is None else {"layer_type": layer_type}
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **extra)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to max_positions, in tables a token chooses from by index: one per
    linear scaling factor tokens may use (`factors[0]` = 1, the model's own; the others for long-context
    adapters, whose frequencies are the model's divided by the factor: transformers' "linear" RoPE), or for
    longrope the short-factor table (0) and the long-factor one (1), used by a sequence longer than
    `long_after` (original_max_position_embeddings). `lookup` gathers them once per step for all layers that
    share it."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int,
                 layer_type: str | None = None, factors: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        rope_type = _rope_type(config, layer_type)
        inv_freq, scale = rope_inverse_frequencies(config, head_dim, layer_type)
        if len(factors) > 1 and rope_type != "default":
            raise ValueError(f"long-context LoRA (--long-lora-scaling-factors) scales plain RoPE linearly; this "
                             f"model's RoPE is {rope_type!r}, which it does not compose with")
        tables = [inv_freq / f for f in factors]
        self.long_after: int | None = None
        if rope_type == "longrope":  # inv_freq above is the short table (transformers': no seq_len given)
            params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
            self.long_after = params["original_max_position_embeddings"]
            extra = {} if layer_type is None else {"layer_type": layer_type}
            long_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), seq_len=self.long_after + 1,
                                                          **extra)
            tables.append(long_freq)
        self.rotary_dim = inv_freq.numel() * 2
        positions = torch.arange(max_positions, dtype=torch.float32)
        emb = torch.stack([torch.cat([positions[:, None] * t[None, :]] * 2, dim=-1) for t in tables])
        self.register_buffer("cos", emb.cos() * scale, persistent=False)  # [factors, positions, rotary_dim]
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype,
               factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as [T, 1, rotary_dim] in the activation dtype (as transformers casts them); `factors`:
        each token's index into the factors (None: all the model's own)."""
        if factors is None:
            cos, sin = self.cos[0, positions], self.sin[0, positions]
        else:
            cos, sin = self.cos[factors, positions], self.sin[factors, positions]
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def _rope_type(config: PretrainedConfig, layer_type: str | None) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    return (params[layer_type] if layer_type is not None else params).get("rope_type", "default")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the first rotary_dim features, as two halves or (`interleaved`, GLM)
    as neighbouring pairs (0,1), (2,3)..."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin, interleaved), x[..., rot:]), dim=-1)
    half = rot // 2
    if interleaved:
        cos, sin = cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q [T, H, D] and k [T, KVH, D], then k and v written to the paged caches at `slot_mapping`;
    returns the rotated q and k. One fused pass on CPU (q and k rotated in place) for the two-halves layout."""
    kernel = cpu_kernel(fused_ops_module, q)
    if kernel is not None and cos.dtype == q.dtype and not interleaved:
        kernel.rotary_kv_write(q, k, v, cos[:, 0], sin[:, 0], k_cache, v_cache, slot_mapping)
        return q, k
    q, k = apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k
