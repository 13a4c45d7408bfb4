"""Building blocks of the decoder: linear (LoRA-aware), attention over the paged KV cache, rotary, norms,
activations, sampler."""
