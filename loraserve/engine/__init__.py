"""The serving engine: sequences, paged KV blocks, scheduling, model running, the step loop."""
