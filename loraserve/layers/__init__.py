"""Building blocks of the decoder: the forward-batch metadata, linear layers with LoRA slots and the batched
LoRA ops, attention over the paged KV cache, rotary, norms, activations, sampler, C++ CPU kernels."""
