"""Finding and reading an adapter's files: its folder (a path or a hub id in the local cache), its
adapter_config.json and its weights, with errors that say what to fix."""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder's bytes, read first and apart from parsing them: reading may wait on a disk (no core
    busy), parsing and checking are CPU work that the engine may schedule between its steps."""

    folder: Path
    config: bytes
    weights_path: Path | None  # the safetensors (or legacy .bin) file; None: the folder has neither
    weights: bytes = b""


def read_adapter_files(folder: Path, name: str) -> AdapterFiles:
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: its folder {folder} does not exist (any more); check the path")
    path = folder / CONFIG_FILE
    try:
        config = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; pass the folder that PEFT's save_pretrained wrote"
        ) from None
    for weights_path in (folder / SAFETENSORS_FILE, folder / BIN_FILE):
        if weights_path.is_file():
            return AdapterFiles(folder, config, weights_path, weights_path.read_bytes())
    return AdapterFiles(folder, config, None)


def parse_json(data: bytes, path: Path, name: str) -> dict[str, Any]:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"adapter {name!r}: {path} is not valid JSON ({e}); fix it or re-save the adapter") from e
    if not isinstance(raw, dict):
        raise LoRAError(f"adapter {name!r}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def parse_weights(files: AdapterFiles, name: str) -> dict[str, torch.Tensor]:
    """The weights file's tensors."""
    path, data = files.weights_path, files.weights
    if path is None:
        raise AdapterNotFoundError(
            f"adapter {name!r}: {files.folder} has {CONFIG_FILE} but no weights; "
            f"expected {SAFETENSORS_FILE} (or legacy {BIN_FILE})"
        )
    if path.name == SAFETENSORS_FILE:
        try:
            return load_safetensors(data)
        except (SafetensorError, OSError) as e:
            raise LoRAError(
                f"adapter {name!r}: {path} is corrupt or truncated ({e}); re-download or re-save the adapter"
            ) from e
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise LoRAError(
            f"adapter {name!r}: {path} is corrupt or not a PyTorch state dict ({e}); re-save the adapter"
        ) from e
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise LoRAError(f"adapter {name!r}: {path} does not hold a state dict of tensors; re-save the adapter")
    return tensors
