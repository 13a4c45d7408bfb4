"""Where loraserve keeps what it makes once and reuses: converted models and compiled kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LORASERVE_CACHE, or ~/.cache/loraserve."""
    env = os.environ.get("LORASERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraserve"
