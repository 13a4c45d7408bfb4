"""OpenAI-compatible HTTP server: `loraserve serve`, or build_app / run_server from Python."""
from loraserve.server.api import ServerSettings, build_app, run_server

__all__ = ["ServerSettings", "build_app", "run_server"]
