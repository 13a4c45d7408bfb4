"""loraserve on Ray Serve: replicas of the engine behind one OpenAI-compatible ingress, with adapter-aware
routing (`pip install 'loraserve[ray]'`; docs/scale-out.md).

`serve run loraserve.ray:build_app model=... lora_modules="a=/path/a b=/path/b" replicas=2`
"""
from loraserve.ray.app import ScaleOut, application, build_app

__all__ = ["ScaleOut", "application", "build_app"]
