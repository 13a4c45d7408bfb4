"""LoRA adapters: reading and validating PEFT checkpoints, host copies by id, adapter slots beside the model."""
