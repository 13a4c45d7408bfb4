"""Finding and reading an adapter's files: its folder (a path or a hub id in the local cache), its
adapter_config.json and its weights, with errors that say what to fix."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraserve.errors import AdapterNotFoundError, LoRAError, ModelNotFoundError
from loraserve.lora.peft_config import CONFIG_FILE
from loraserve.model.loader import local_snapshot

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


def resolve_adapter_path(path_or_hub_id: str) -> Path:
    """A local folder as an absolute path, or a hub id's snapshot in the local Hugging Face cache (never
    downloads). Two spellings of one folder (relative, absolute, trailing slash) resolve to the same path."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise AdapterNotFoundError(
            f"adapter path {path_or_hub_id!r} is a file; pass the folder holding {CONFIG_FILE} and {SAFETENSORS_FILE}"
        )
    try:
        return local_snapshot(path_or_hub_id)
    except ModelNotFoundError as e:
        raise AdapterNotFoundError(
            f"adapter {path_or_hub_id!r} is neither an existing folder nor a hub id in the local Hugging Face cache "
            f"(loraserve never downloads); check the path, or fetch it with `huggingface-cli download "
            f"{path_or_hub_id}` on a connected machine"
        ) from e


def read_config_bytes(folder: Path, name: str) -> bytes:
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: its folder {folder} does not exist (any more); check the path")
    path = folder / CONFIG_FILE
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; pass the folder that PEFT's save_pretrained wrote"
        ) from None


def parse_json(data: bytes, path: Path, name: str) -> dict[str, Any]:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"adapter {name!r}: {path} is not valid JSON ({e}); fix it or re-save the adapter") from e
    if not isinstance(raw, dict):
        raise LoRAError(f"adapter {name!r}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def read_weights(folder: Path, name: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The weights file's bytes (for the content hash) and its tensors, read once."""
    safetensors_path, bin_path = folder / SAFETENSORS_FILE, folder / BIN_FILE
    if safetensors_path.is_file():
        data = safetensors_path.read_bytes()
        try:
            return data, load_safetensors(data)
        except (SafetensorError, OSError) as e:
            raise LoRAError(
                f"adapter {name!r}: {safetensors_path} is corrupt or truncated ({e}); "
                f"re-download or re-save the adapter"
            ) from e
    if bin_path.is_file():
        data = bin_path.read_bytes()
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise LoRAError(
                f"adapter {name!r}: {bin_path} is corrupt or not a PyTorch state dict ({e}); re-save the adapter"
            ) from e
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise LoRAError(f"adapter {name!r}: {bin_path} does not hold a state dict of tensors; re-save the adapter")
        return data, tensors
    raise AdapterNotFoundError(
        f"adapter {name!r}: {folder} has {CONFIG_FILE} but no weights; "
        f"expected {SAFETENSORS_FILE} (or legacy {BIN_FILE})"
    )
