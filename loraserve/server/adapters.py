"""Served model names: the base model's names and every registered adapter, each adapter a LoRARequest
with an id of its own for the engine's caches."""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field

from loraserve.lora_request import LoRAMix, LoRARequest
from loraserve.server.policy import Principal
from loraserve.server.protocol import APIError, MixEntry, bad_request


@dataclass(frozen=True)
class LoRAModule:
    """One `--lora-modules` item."""

    name: str
    path: str
    base_model_name: str | None = None

    def at(self, path: str) -> LoRAModule:
        """The same adapter, read from `path` (where the adapter sources' check resolved it)."""
        return dataclasses.replace(self, path=path)


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
    report: dict  # the engine's load report, fixed for the files it was loaded from
    created: int = field(default_factory=lambda: int(time.time()))


class AdapterRegistry:
    """Maps a request's `model` to the adapter it selects. Runs on the event loop only, so no lock: every
    change below happens between two awaits, which makes a name's swap atomic for new requests.

    A name being loaded is reserved, so a second load of it is refused at once instead of racing the
    first. Each load gets a new lora_int_id (never reused), so reloading a name in place is, for the engine,
    a new adapter plus the removal of the old one: running requests keep the weights they started with."""

    def __init__(self, base_names: list[str], base_root: str) -> None:
        self.base_names = base_names
        self.base_root = base_root
        self.created = int(time.time())
        self._adapters: dict[str, _Adapter] = {}
        self._loading: set[str] = set()
        self._ids = itertools.count(1)

    def begin_load(self, module: LoRAModule, replace: bool = False) -> LoRARequest:
        """Reserve the name and make the request to validate. A served name is refused unless `replace`
        (vLLM's load_inplace); a name being loaded is always refused. End with finish_load or cancel_load."""
        name = module.name
        if name in self.base_names:
            raise bad_request(f"{name!r} is the base model's name; pick another lora_name", "lora_name")
        if name in self._loading:
            raise bad_request(f"adapter {name!r} is being loaded by another request; wait for it to finish",
                              "lora_name")
        if name in self._adapters and not replace:
            raise bad_request(f"the model name {name!r} is already served; pick another lora_name, or send "
                              f"load_inplace=true to replace it", "lora_name")
        self._loading.add(name)
        return LoRARequest(name, next(self._ids), module.path, module.base_model_name)

    def finish_load(self, request: LoRARequest, report: dict) -> LoRARequest | None:
        """Serve the validated adapter under its name; returns the request it replaced, if any."""
        self._loading.discard(request.lora_name)
        old = self._adapters.get(request.lora_name)
        self._adapters[request.lora_name] = _Adapter(request, request.base_model_name or self.base_names[0], report)
        return old.request if old is not None else None

    def cancel_load(self, request: LoRARequest) -> None:
        self._loading.discard(request.lora_name)

    def remove(self, name: str) -> LoRARequest:
        if name in self.base_names:
            raise bad_request(f"{name!r} is the base model, not an adapter; it cannot be unloaded", "lora_name")
        adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise self.not_loaded(name)
        return adapter.request

    @staticmethod
    def not_loaded(name: str) -> APIError:
        return APIError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found")

    def _visible(self, name: str, principal: Principal) -> _Adapter | None:
        """The adapter served under `name` if the principal may use it: another tenant's adapter is, to this
        caller, exactly as absent as an unknown name."""
        adapter = self._adapters.get(name)
        return adapter if adapter is not None and principal.may_use(name) else None

    def resolve(self, model: str, principal: Principal) -> LoRARequest | None:
        """None for the base model, the adapter's request for an adapter name; 404 otherwise."""
        if model in self.base_names:
            return None
        adapter = self._visible(model, principal)
        if adapter is None:
            raise model_not_found(model)
        return adapter.request

    def resolve_request(self, model: str, lora_scale: float | None, mix: list[MixEntry] | None,
                        principal: Principal) -> LoRARequest | LoRAMix | None:
        """What a generation request applies: the adapter `model` names (at `lora_scale`), the base model, or
        the weighted mix of served adapters `mix`, where `model` names the base model or one of the mix."""
        lora = self.resolve(model, principal)
        if mix is None:
            if lora_scale is None:
                return lora
            if lora is None:
                raise bad_request(f"lora_scale applies to an adapter but model {model!r} is the base model; name an "
                                  f"adapter in model (or mix adapters with 'adapters')", "lora_scale")
            return dataclasses.replace(lora, lora_scale=lora_scale)
        entries = []
        for index, entry in enumerate(mix):
            adapter = self._visible(entry.name, principal)
            if adapter is None:
                raise bad_request(f"adapters[{index}] names {entry.name!r}, which is not a served adapter; GET "
                                  f"/v1/models lists them", "adapters")
            entries.append((adapter.request, entry.weight))
        if lora is not None and lora.lora_name not in {entry.name for entry in mix}:
            raise bad_request(f"model names the adapter {model!r}, which is not in adapters; with adapters, name the "
                              f"base model or one of the mix in model", "model")
        return LoRAMix(entries)

    def cards(self, max_model_len: int, principal: Principal) -> list[dict]:
        """/v1/models entries: the base names, then each adapter the principal may use with parent and root,
        and its load report under "lora" (kinds, ranks, targets, bytes, content hash...)."""
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "loraserve",
                  "root": self.base_root, "parent": None, "max_model_len": max_model_len}
                 for name in self.base_names]
        cards += [{"id": name, "object": "model", "created": a.created, "owned_by": "loraserve",
                   "root": a.request.lora_path, "parent": a.parent, "max_model_len": max_model_len,
                   "lora": a.report}
                  for name, a in self._adapters.items() if principal.may_use(name)]
        return cards


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; GET /v1/models lists the served models", "model",
                    "model_not_found")
