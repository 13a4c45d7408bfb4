"""Shared fixtures. Tests never reach the hub; the default model is converted once per machine into the real
cache (or $LORASERVE_CACHE when set) and reused by every later run."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from loraserve.model.loader import resolve_model


@pytest.fixture(scope="session")
def default_model_path():
    return resolve_model(None)
