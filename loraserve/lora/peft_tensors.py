"""What each tensor of a PEFT weights file is, by its key: LoRA factors of a linear module or of an
embedding, lora_B's bias, a DoRA magnitude, trainable-token rows, or a whole tensor saved beside them
(modules_to_save, trained base biases, the embedding copies save_embedding_layers writes).

PEFT's keys are 'base_model.model.<module>.<what>', where <what> may carry the adapter's name
('lora_A.default.weight' from some tools): both spellings are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraserve.errors import LoRAError

_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model twice
_FACTORS = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b"}


@dataclass
class ModuleTensors:
    """A module's adapter tensors as the file holds them (PEFT's shapes and orientation)."""

    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    lora_b_bias: torch.Tensor | None = None  # lora_bias=True
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector
    token_rows: torch.Tensor | None = None  # trainable_token_indices: the new values of those rows
    embedding: bool = False  # lora_embedding_A / B: A is [r, vocab], read by token id


@dataclass
class AdapterTensors:
    modules: dict[str, ModuleTensors] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint name -> tensor saved whole


def classify(tensors: dict[str, torch.Tensor], name: str,
             renames: tuple[tuple[str, str], ...] = ()) -> AdapterTensors:
    """Sort a weights file's tensors by module and kind; a key read twice (two spellings) is refused. `renames`:
    the checkpoint's name fragments -> the model's (ChatGLM's), applied to every key."""
    found = AdapterTensors()
    for key, tensor in sorted(tensors.items()):  # by name, whatever order the file lists them in
        if not tensor.is_floating_point():
            raise LoRAError(f"adapter {name!r}: tensor {key!r} has dtype {tensor.dtype}; quantized adapter weights "
                            f"are not supported, save the adapter in float")
        if not torch.isfinite(tensor).all():  # would turn every output of a request using it into NaN
            raise LoRAError(f"adapter {name!r}: tensor {key!r} holds NaN or infinite values; the training diverged "
                            f"or the file is damaged, re-train or re-save the adapter")
        module_key = key.removeprefix(_PEFT_PREFIX)
        for old, new in renames:
            module_key = module_key.replace(old, new)
        parts = module_key.split(".")
        kind = _kind(parts)
        if kind is None:
            if "original_module" in parts:  # save_embedding_layers' copy of a saved module's base: not the adapter's
                continue
            # an adapted module's own tensors sit under its LoRA or token wrapper (save_embedding_layers' table
            # copies, biases trained with bias='all' / 'lora_only'); save_embedding_layers also writes a saved
            # module's trained copy again under its wrapper's name
            whole = ".".join(p for p in parts if p not in ("base_layer", "modules_to_save", "token_adapter"))
            if whole in found.whole and not torch.equal(found.whole[whole], tensor):
                raise LoRAError(f"adapter {name!r} holds two different tensors for {whole!r}; re-save the adapter")
            found.whole[whole] = tensor
            continue
        index, attribute = kind
        module = found.modules.setdefault(".".join(parts[:index]), ModuleTensors())
        if getattr(module, attribute) is not None:
            raise LoRAError(f"adapter {name!r} holds two {parts[index]} tensors for module "
                            f"{'.'.join(parts[:index])!r}; re-save the adapter")
        setattr(module, attribute, tensor)
        module.embedding |= parts[index].startswith("lora_embedding_")
    return found


def _kind(parts: list[str]) -> tuple[int, str] | None:
    """(index of the marker part, ModuleTensors attribute) for an adapter tensor's key, None for a whole one."""
    for i, part in enumerate(parts):
        rest = len(parts) - i
        if i == 0:
            continue
        if part in ("lora_A", "lora_B") and rest in (2, 3) and parts[-1] in ("weight", "bias"):
            if parts[-1] == "bias":
                return (i, "lora_b_bias") if part == "lora_B" else None
            return i, _FACTORS[part]
        if part in ("lora_embedding_A", "lora_embedding_B") and rest in (1, 2):
            return i, _FACTORS[part]
        if part == "lora_magnitude_vector" and rest in (1, 2, 3):
            return i, "magnitude"
        if part == "token_adapter" and rest in (2, 3) and parts[i + 1] == "trainable_tokens_delta":
            return i, "token_rows"
    return None
