"""How many KV blocks to allocate when the user does not say."""
from __future__ import annotations

import torch

from loraserve.config import EngineConfig
from loraserve.model.registry import DecoderSpec

# Without an explicit size the cache takes this share of the memory available at start, up to a cap that
# already holds hundreds of long sequences of a small model.
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_MEMORY_CAP_GB = 1.0


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; set num_kv_blocks or kv_cache_memory_gb")


def bytes_per_block(spec: DecoderSpec, block_size: int, dtype: torch.dtype) -> int:
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * dtype.itemsize


def choose_num_blocks(spec: DecoderSpec, config: EngineConfig, dtype: torch.dtype, max_model_len: int) -> int:
    """Blocks from kv_cache_memory_gb, else a share of available memory; never more than every running
    sequence could use at full length."""
    if config.kv_cache_memory_gb is not None:
        budget = config.kv_cache_memory_gb * 2**30
    else:
        budget = min(DEFAULT_MEMORY_FRACTION * available_memory_bytes(), DEFAULT_MEMORY_CAP_GB * 2**30)
    blocks = int(budget // bytes_per_block(spec, config.block_size, dtype))
    most_useful = config.max_num_seqs * -(-max_model_len // config.block_size)
    return max(1, min(blocks, most_useful))
