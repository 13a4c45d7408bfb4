"""loraserve: serve many LoRA adapters on one shared base LLM."""
from loraserve.llm import LLM
from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loraserve.sampling_params import RequestOutputKind, SamplingParams
from loraserve.version import __version__

__all__ = ["LLM", "CompletionOutput", "LoRAMix", "LoRARequest", "RequestMetrics", "RequestOutput", "RequestOutputKind",
           "SamplingParams", "__version__"]
