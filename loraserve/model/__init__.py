"""Base model: finding its files (local folder, hub cache, GGUF), reading its weights, and the decoder itself."""
