"""Finding and reading an adapter's files: its folder (a path or a hub id in the local cache), its
adapter_config.json and its weights, with errors that say what to fix."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def weights_file(folder: Path) -> Path | None:
    """The weights file an adapter is read from: adapter_model.safetensors, else the legacy (pickled)
    adapter_model.bin, else None."""
    return next((path for path in (folder / SAFETENSORS_FILE, folder / BIN_FILE) if path.is_file()), None)


def read_adapter_files(folder: Path, name: str, max_file_mb: int) -> AdapterFiles:
    """The folder's config and weights bytes; a file above `max_file_mb` MiB, or a safetensors file whose
    header does not fit it, is refused before its data is read (a crafted file cannot make us allocate)."""
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter {name!r}: its folder {folder} does not exist (any more); check the path")
    try:
        config = _read_limited(folder / CONFIG_FILE, name, max_file_mb)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} has no {CONFIG_FILE}; pass the folder that PEFT's save_pretrained wrote"
        ) from None
    weights_path = weights_file(folder)
    if weights_path is None:
        return AdapterFiles(folder, config, None)
    return AdapterFiles(folder, config, weights_path, _read_limited(weights_path, name, max_file_mb))


def _read_limited(path: Path, name: str, max_file_mb: int) -> bytes:
    """The file's bytes, its size taken from the open file (the file read is the file measured)."""
    limit = max_file_mb * 2**20
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise LoRAError(
                f"adapter {name!r}: {path} is {size / 2**20:.1f} MiB, above the limit of {max_file_mb} MiB per "
                f"adapter file; if the file is genuine, start the server with --max-lora-file-mb "
                f"{math.ceil(size / 2**20)}"
            )
        if path.name == SAFETENSORS_FILE:
            _check_safetensors_header(file, size, path, name)
            file.seek(0)
        data = file.read(limit + 1)  # a file grown since it was measured is not read past the limit
    if len(data) > limit:
        raise LoRAError(f"adapter {name!r}: {path} grew above the limit of {max_file_mb} MiB while being read; "
                        f"retry once the adapter is written, or raise --max-lora-file-mb")
    return data


# bytes per element of every safetensors dtype a whole-byte tensor may have
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def _check_safetensors_header(file: BinaryIO, size: int, path: Path, name: str) -> None:
    """Refuse a safetensors header that does not describe this file exactly: every tensor's bytes
    (known dtype, shape) inside the data section. Read from the header alone, so nothing is allocated for
    a tensor a crafted header claims."""
    def corrupt(why: str) -> LoRAError:
        return LoRAError(f"adapter {name!r}: {path} is corrupt or truncated ({why}); re-download or re-save the "
                         f"adapter")

    prefix = file.read(8)
    if len(prefix) < 8:
        raise corrupt(f"{size} bytes, shorter than a safetensors header")
    header_size = int.from_bytes(prefix, "little")
    if header_size > min(_MAX_SAFETENSORS_HEADER, size - 8):
        raise corrupt(f"its header claims {header_size} bytes, the file holds {size - 8} after the length and "
                      f"a header may take at most {_MAX_SAFETENSORS_HEADER}")
    try:
        header = json.loads(file.read(header_size))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an integer too long, nested too deep
        raise corrupt(f"its header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_size = size - 8 - header_size
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"tensor {key!r} lacks a dtype, shape or pair of data_offsets ({e!r})") from e
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
            raise corrupt(f"tensor {key!r} has dtype {dtype!r}, not one of {', '.join(_SAFETENSORS_ITEMSIZE)}")
        itemsize = _SAFETENSORS_ITEMSIZE[dtype]
        numbers = [*shape, begin, end]
        if not all(type(n) is int and n >= 0 for n in numbers):
            raise corrupt(f"tensor {key!r} has shape {shape} and data_offsets {[begin, end]}, not counts")
        elements = 1
        for n in shape:  # capped: a crafted shape's product could take long to compute
            elements = min(elements * n, data_size + 1)
        if elements * itemsize != end - begin or not begin <= end <= data_size:
            raise corrupt(f"tensor {key!r} of shape {str(shape)[:80]} {dtype} does not fit its data_offsets "
                          f"{[begin, end]} within the file's data section of {data_size} bytes")


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
