"""The adapters the application serves, one table for every replica and ingress.

A runtime load or unload through the ingress is validated on one replica, then written here with a new
version number. Every forwarded request carries the version its ingress saw; a replica behind it reads the
table and applies the difference before serving it, and a replica Serve starts later (after a failure, or
scaling up) catches up on its first request. So a change reaches every replica, including those that were
not running when it was made, without the ingress having to find them.

Replicas also report the content hashes of the start-up adapters they loaded (the ingress routes on hashes,
and an adapter is hashed only once read).
"""
from __future__ import annotations

from dataclasses import dataclass

from loraserve.server.adapters import LoRAModule


@dataclass(frozen=True)
class CatalogEntry:
    path: str
    base_model_name: str | None = None
    content_hash: str | None = None  # None until a replica has loaded it


@dataclass(frozen=True)
class CatalogSnapshot:
    version: int
    adapters: dict[str, CatalogEntry]


class AdapterCatalog:
    """One Serve replica (no CPU of its own). It keeps no files; if Serve restarts it, it starts over from the
    start-up adapters, and replicas re-report their hashes."""

    def __init__(self, modules: list[LoRAModule]) -> None:
        self._version = 0
        self._adapters = {m.name: CatalogEntry(m.path, m.base_model_name) for m in modules}

    def snapshot(self) -> CatalogSnapshot:
        return CatalogSnapshot(self._version, dict(self._adapters))

    def put(self, name: str, path: str, content_hash: str) -> int:
        """Serve `name` from `path` (a load, or a load in place); the new version."""
        self._adapters[name] = CatalogEntry(path, None, content_hash)
        self._version += 1
        return self._version

    def remove(self, name: str) -> int:
        self._adapters.pop(name, None)
        self._version += 1
        return self._version

    def record_hashes(self, hashes: dict[str, str]) -> None:
        """The content hash of each adapter name a replica serves. Only hashes not known yet are taken: a
        replica not yet caught up with a load in place still reports the old files' hash."""
        for name, content_hash in hashes.items():
            entry = self._adapters.get(name)
            if entry is not None and entry.content_hash is None:
                self._adapters[name] = CatalogEntry(entry.path, entry.base_model_name, content_hash)
