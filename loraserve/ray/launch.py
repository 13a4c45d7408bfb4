"""`loraserve serve --ray-replicas N`: run the application on a Ray of its own (on loopback) or on a cluster
(`--ray-address`), until SIGTERM / SIGINT."""
from __future__ import annotations

import math
import os
import signal
import threading

import ray
from ray import serve

from loraserve.config import EngineConfig
from loraserve.ray.app import APP_NAME, ScaleOut, application
from loraserve.server.api import ServerSettings


def run(config: EngineConfig, settings: ServerSettings, scale: ScaleOut, host: str, port: int,
        address: str | None = None) -> None:
    """Start (or join) Ray, serve the application on host:port, stop it all on a signal. Without `address`,
    Ray runs here with no dashboard; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment before Ray is
    imported (the command line sets it), every Ray process binds 127.0.0.1 only."""
    if address is None:
        cpus = max(os.cpu_count() or 1, math.ceil(scale.replicas * scale.cpus_per_replica))
        ray.init(num_cpus=cpus, include_dashboard=False)
    else:
        ray.init(address=address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(config, settings, scale), name=APP_NAME, route_prefix="/")
        print(f"loraserve on Ray Serve: {scale.replicas} replica(s) at http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()
