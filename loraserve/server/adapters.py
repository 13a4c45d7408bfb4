"""Served model names: the base model's names and every registered adapter, each adapter a LoRARequest
with an id of its own for the engine's caches."""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

from loraserve.lora.request import LoRARequest
from loraserve.server.protocol import APIError, bad_request


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` item."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModule:
    """`name=path` or a JSON object {"name", "path", "base_model_name"?} (vLLM's two forms)."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{text!r} is not valid JSON ({e})") from e
        unknown = set(item) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"{text!r} has unknown keys {sorted(unknown)}; use name, path, base_model_name")
        if not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise ValueError(f"{text!r} needs string values for 'name' and 'path'")
        base = item.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ValueError(f"{text!r}: base_model_name must be a string")
        name, path = item["name"], item["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is not name=path (nor a JSON object)")
        base = None
    if not name or not path:
        raise ValueError(f"{text!r}: both the adapter name and its path must be non-empty")
    return LoRAModule(name, path, base)


@dataclass
class _Adapter:
    request: LoRARequest
    parent: str
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterRegistry:
    """Maps a request's `model` to the adapter it selects. Runs on the event loop only, so no lock."""

    def __init__(self, base_names: list[str], base_root: str) -> None:
        self.base_names = base_names
        self.base_root = base_root
        self.created = int(time.time())
        self._adapters: dict[str, _Adapter] = {}
        self._ids = itertools.count(1)  # never reused: an id names one adapter for the engine's caches

    def lora_request(self, module: LoRAModule) -> LoRARequest:
        """A request for a not yet registered adapter (refuses names already served)."""
        self._check_free(module.name)
        return LoRARequest(module.name, next(self._ids), module.path, module.base_model_name)

    def add(self, request: LoRARequest) -> None:
        """Register an adapter that was validated (engine.prepare_lora) after lora_request made it; the name
        is checked again because another load of it may have finished meanwhile."""
        self._check_free(request.lora_name)
        self._adapters[request.lora_name] = _Adapter(request, request.base_model_name or self.base_names[0])

    def _check_free(self, name: str) -> None:
        if name in self.base_names or name in self._adapters:
            raise bad_request(f"the model name {name!r} is already served; pick another lora_name", "lora_name")

    def remove(self, name: str) -> LoRARequest:
        if name in self.base_names:
            raise bad_request(f"{name!r} is the base model, not an adapter; it cannot be unloaded", "lora_name")
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise APIError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found")
        return adapter.request

    def resolve(self, model: str) -> LoRARequest | None:
        """None for the base model, the adapter's request for an adapter name; 404 otherwise."""
        if model in self.base_names:
            return None
        adapter = self._adapters.get(model)
        if adapter is None:
            raise APIError(404, f"The model {model!r} does not exist; GET /v1/models lists the served models",
                           "model", "model_not_found")
        return adapter.request

    def cards(self, max_model_len: int) -> list[dict]:
        """/v1/models entries: the base names, then each adapter with parent and root."""
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "loraserve",
                  "root": self.base_root, "parent": None, "max_model_len": max_model_len}
                 for name in self.base_names]
        cards += [{"id": name, "object": "model", "created": a.created, "owned_by": "loraserve",
                   "root": a.request.lora_path, "parent": a.parent, "max_model_len": max_model_len}
                  for name, a in self._adapters.items()]
        return cards
