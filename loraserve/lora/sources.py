"""Where adapters may be loaded from: folders inside the operator's roots (--lora-roots) and hub ids in the
local Hugging Face cache; pickled weights (adapter_model.bin) at runtime only with --allow-lora-bin.

Without roots any local path the server can read is allowed, as before roots existed. A refusal never tells
whether a path outside the roots exists: existing and missing ones get the same message.
"""
from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import AdapterNotFoundError, AdapterSourceError, LoRAError
from loraserve.lora.adapter_files import BIN_FILE, SAFETENSORS_FILE, resolve_adapter_path, weights_file


@dataclass(frozen=True)
class AdapterSources:
    """The operator's rules for adapter paths. Roots should be absolute: a relative root, like a relative
    adapter path, is taken from the server's working directory; each is resolved (symlinks too) once, here."""

    roots: tuple[Path, ...] = ()  # empty: any local path
    allow_bin: bool = False  # runtime loads may read legacy adapter_model.bin (a pickle)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roots", tuple(_resolved_root(Path(root)) for root in self.roots))

    def check(self, path_or_hub_id: str, runtime: bool) -> str:
        """The LoRARequest.lora_path to load `path_or_hub_id` from: a local folder resolved to its absolute
        path, a hub id in the local cache unchanged. `runtime`: loaded while serving (a request or the
        load API), where a pickle is refused unless allowed; start-up adapters are the operator's own.
        Raises AdapterSourceError (outside the roots, a pickle) or AdapterNotFoundError (nothing there)."""
        try:
            if self.roots:
                lora_path, folder = self._inside_roots(path_or_hub_id)
            else:
                folder = resolve_adapter_path(path_or_hub_id)
                lora_path = str(folder) if Path(path_or_hub_id).expanduser().is_dir() else path_or_hub_id
            weights = weights_file(folder)
        except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system...
            if isinstance(e, LoRAError):
                raise
            raise AdapterNotFoundError(f"lora_path {path_or_hub_id[:300]!r} cannot be used as a path "
                                       f"({e.strerror if isinstance(e, OSError) else e}); check it") from None
        if runtime and not self.allow_bin and weights is not None and weights.name == BIN_FILE:
            raise AdapterSourceError(
                f"adapter {path_or_hub_id!r}: its weights are {BIN_FILE}, a pickle, and a pickle can run code when "
                f"it is read; convert it to safetensors (re-save the adapter with PEFT's save_pretrained, or write "
                f"its state dict with safetensors.torch.save_file as {SAFETENSORS_FILE}), or start the server "
                f"with --allow-lora-bin"
            )
        return lora_path

    def _inside_roots(self, path_or_hub_id: str) -> tuple[str, Path]:
        """(lora_path, folder) for a folder inside the roots or a cached hub id. A string that could be a hub
        id and is not a folder inside the roots is looked up in the cache (if no local entry of that name
        would shadow it); anything else is a path, refused outside the roots."""
        local = Path(path_or_hub_id).expanduser()
        hub_id = _is_hub_id(path_or_hub_id)
        try:
            real: Path | None = local.resolve()  # not strict: places a missing path too, by the links that exist
        except (OSError, RuntimeError):  # a symlink loop
            real = None
        if real is not None and self._holds(real) and (real.exists() or not hub_id):
            folder = resolve_adapter_path(str(real))  # inside the roots a missing folder or a file may be named
            self._check_entries(folder, path_or_hub_id)
            return str(folder), folder
        if not hub_id:
            raise AdapterSourceError(
                f"adapter path {path_or_hub_id!r} is outside the folders this server loads adapters from "
                f"({self._roots_text()}); put the adapter inside one of them, or start the server with "
                f"--lora-roots DIR ... naming a folder that holds it"
            )
        if not os.path.lexists(local):  # an entry of that name outside the roots is what the engine would read
            with suppress(AdapterNotFoundError):
                return path_or_hub_id, resolve_adapter_path(path_or_hub_id)
        raise AdapterNotFoundError(
            f"adapter {path_or_hub_id!r} is neither a folder inside the adapter roots ({self._roots_text()}) nor a "
            f"hub id in the local Hugging Face cache (loraserve never downloads); put it inside a root, or fetch "
            f"it with `huggingface-cli download {path_or_hub_id}` on a connected machine"
        )

    def _check_entries(self, folder: Path, path_or_hub_id: str) -> None:
        """Every entry of the folder (config, weights, tokenizer files) must stay inside the roots: a symlink
        out would let the engine read any file through an allowed folder."""
        for entry in sorted(folder.iterdir()):
            try:
                target: Path | None = entry.resolve()
            except (OSError, RuntimeError):
                target = None
            if target is None or not self._holds(target):
                raise AdapterSourceError(
                    f"adapter {path_or_hub_id!r}: {entry.name} in its folder is a symlink that leads outside the "
                    f"folders this server loads adapters from ({self._roots_text()}); copy the file into the "
                    f"folder, or start the server with --lora-roots DIR ... naming where it leads"
                )

    def _holds(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def _roots_text(self) -> str:
        return ", ".join(str(root) for root in self.roots)


def _resolved_root(root: Path) -> Path:
    try:
        resolved = root.expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"adapter root {str(root)!r} does not exist ({e}); create it or fix --lora-roots") from e
    if not resolved.is_dir():
        raise ValueError(f"adapter root {str(root)!r} is not a folder; --lora-roots takes folders")
    return resolved


def _is_hub_id(text: str) -> bool:
    """Whether `text` is spelled as a hub repo id ('name' or 'owner/name'), which a path like '/x', '~/x',
    '../x' or 'a/b/c' never is."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
