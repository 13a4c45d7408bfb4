"""Shared fixtures. Tests never reach the hub; the default model is converted once per machine into the real
cache (or $LORASERVE_CACHE when set) and reused by every later run."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from loraserve.model.loader import resolve_model


@pytest.fixture(scope="session")
def default_model_path():
    return resolve_model(None)


def pytest_itemcollected(item):
    """Under pytest-xdist (`--dist loadgroup`), keep the tests that share an expensive module- or
    class-scoped fixture instance on one worker, so each tiny model / engine / server is built once: the
    group is the module plus the parameters of those fixtures. Tests using no such fixture spread freely.
    (Marked as each item is collected: xdist reads the marks in its own collection_modifyitems.)"""
    fixture_info = getattr(item, "_fixtureinfo", None)
    if fixture_info is None:
        return
    shared = [name for name in item.fixturenames
              if (defs := fixture_info.name2fixturedefs.get(name)) and defs[-1].scope in ("module", "class", "package")]
    if not shared:
        return
    params = getattr(item, "callspec", None)
    key = [item.module.__name__] + [f"{n}={params.indices[n]}" for n in shared
                                    if params is not None and n in params.indices]
    item.add_marker(pytest.mark.xdist_group("|".join(key)))
