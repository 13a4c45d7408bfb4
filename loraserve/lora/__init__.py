"""LoRA adapters: reading PEFT checkpoints, per-layer adapter slots and the batched LoRA matmuls."""
