"""vLLM's import path for LoRARequest (`vllm.lora.request`), for code ported from it."""
from loraserve.lora_request import LoRARequest

__all__ = ["LoRARequest"]
