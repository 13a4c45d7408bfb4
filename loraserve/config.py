"""Engine configuration: dataclasses validated once, at the edge; inner code trusts them.

These dataclasses are the one list of engine options: `LLM(**options)` and the command line's flags are
both made from their fields (`EngineConfig.from_options`, `option_fields`), so an option is added here once.
Building a config is pure: hardware questions (is bf16 fast here?) are answered when the engine starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# Kept here, not imported from model/, so configs stay pure; tests/test_quantized_layers.py checks they agree.
QUANTIZATION_METHODS = ("gptq", "awq", "compressed-tensors", "gguf", "int8", "int4")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _option(default: Any, doc: str, kind: type | None = None, **extra: Any) -> Any:
    """A config field that is also an LLM keyword and a command-line flag; `kind` parses the flag's value
    (None: a switch)."""
    return field(default=default, metadata={"help": doc, "kind": kind, **extra})


def parse_dtype(name: str | torch.dtype, *, auto: torch.dtype, what: str) -> torch.dtype:
    """'auto' | 'bfloat16' | 'float16' | 'float32' | torch.dtype -> torch.dtype ('auto' -> `auto`)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _check_dtype_name(value: str | torch.dtype, what: str) -> None:
    if not isinstance(value, torch.dtype) and value != "auto" and value not in DTYPES:
        raise ValueError(f"{what} must be one of auto, {', '.join(DTYPES)}; got {value!r}")


@dataclass
class LoRAConfig:
    """Adapter capacity. Slots (max_loras) live beside the model; host copies (max_cpu_loras) in RAM."""

    max_loras: int = _option(1, "distinct adapters in one batch (slots beside the model)", int)
    max_lora_rank: int = _option(16, "largest adapter rank that can be loaded", int)
    max_cpu_loras: int | None = _option(
        None, "adapters kept in host memory when no request uses them (default: max_loras); adapters of "
              "running requests are always held", int)
    lora_dtype: str | torch.dtype = _option("auto", "adapter weight dtype: auto (the model's), bfloat16, "
                                                    "float16, float32", str)
    lora_extra_vocab_size: int = _option(256, "tokens an adapter may add to the base vocabulary (its own "
                                              "embedding / LM-head rows and tokenizer)", int)
    max_lora_saved_mb: float = _option(1024.0, "MiB of whole copies (modules_to_save, resized vocabulary tables) "
                                               "one adapter may bring; a slot or host copy holds at most that "
                                               "beside its rank factors", float)
    max_loras_per_mix: int = _option(4, "adapters one weighted mix (LoRAMix, the HTTP 'adapters' field) may "
                                        "combine; each needs a slot, so also at most max_loras", int)
    max_lora_file_mb: int = _option(4096, "largest adapter file (adapter_config.json, weights) read, in MiB; a "
                                          "bigger file is refused before any of it is read", int)
    long_lora_scaling_factors: str | tuple[float, ...] | None = _option(
        None, "linear RoPE factors of long-context adapters (adapter_config.json context_length above the "
              "model's), comma-separated, e.g. 4,8; the served context may reach the largest factor times the "
              "model's", str)

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_loras_per_mix", "max_lora_file_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_lora_saved_mb <= 0:
            raise ValueError(f"max_lora_saved_mb must be positive, got {self.max_lora_saved_mb}")
        if self.lora_extra_vocab_size < 0:
            raise ValueError(f"lora_extra_vocab_size must be at least 0, got {self.lora_extra_vocab_size}")
        self.long_lora_scaling_factors = _parse_factors(self.long_lora_scaling_factors)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        _check_dtype_name(self.lora_dtype, "lora_dtype")


@dataclass
class EngineConfig:
    """Everything the engine needs to start. `model=None` selects the default model."""

    model: str | None = _option(None, "HF model folder, hub id in the local cache, or .gguf file "
                                      "(default: SmolLM2-135M-Instruct)", str, positional=True)
    dtype: str | torch.dtype = _option("auto", "weights and activations: auto (bf16 where its matmuls are "
                                               "fast, else fp32), bfloat16, float16, float32", str)
    device: str = _option("cpu", "torch device", str)
    quantization: str | None = _option(
        None, "weights kept quantized: unset reads a GPTQ / AWQ / compressed-tensors checkpoint's own scheme "
              "(a float model stays float, a .gguf is de-quantized); gguf keeps a .gguf's quantized blocks; "
              "int8 / int4 quantize a float model's linear layers at load", str)
    max_model_len: int | None = _option(None, "context length (default: the model's, at most 4096)", int)
    max_num_seqs: int = _option(256, "sequences decoded together in one step", int)
    max_num_batched_tokens: int = _option(512, "tokens per engine step; longer prompts are prefilled in "
                                               "chunks", int)
    max_n: int = _option(16, "most samples (n) one request may ask for", int)
    block_size: int = _option(16, "tokens per KV-cache block", int)
    num_kv_blocks: int | None = _option(None, "KV-cache blocks (default: sized from kv_cache_memory_gb or "
                                              "free memory)", int)
    kv_cache_memory_gb: float | None = _option(None, "memory for the KV cache, in GiB", float)
    enable_prefix_caching: bool = _option(True, "reuse the KV of prompt prefixes already computed under "
                                                "the same adapter (--no-enable-prefix-caching turns it off)")
    seed: int = _option(0, "seed of the sampling noise of requests without a seed of their own", int)
    enable_lora: bool = _option(False, "serve LoRA adapters")
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _check_dtype_name(self.dtype, "dtype")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or unset to follow "
                             f"the checkpoint); got {self.quantization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """A config from flat keyword options (EngineConfig and LoRAConfig fields side by side), as `LLM`
        and the command line take them. An unknown name raises TypeError listing the valid ones."""
        engine_names = {f.name for f in option_fields(EngineConfig)}
        lora_names = {f.name for f in option_fields(LoRAConfig)}
        unknown = set(options) - engine_names - lora_names
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(sorted(unknown))}; valid options: "
                            f"{', '.join(sorted(engine_names | lora_names))}")
        lora = LoRAConfig(**{k: v for k, v in options.items() if k in lora_names})
        return cls(**{k: v for k, v in options.items() if k in engine_names}, lora=lora)


def _parse_factors(value: str | tuple[float, ...] | list[float] | None) -> tuple[float, ...]:
    """'4,8' or a sequence of numbers -> sorted distinct factors, each above 1."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        factors = sorted({float(item) for item in items if str(item).strip()})
    except ValueError:
        raise ValueError(f"long_lora_scaling_factors must be numbers separated by commas (e.g. 4,8); got "
                         f"{value!r}") from None
    if any(factor <= 1 for factor in factors):
        raise ValueError(f"long_lora_scaling_factors must each be above 1; got {value!r}")
    return tuple(factors)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are user options (every field but nested configs)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]
