"""The Serve application: an adapter catalog, N engine replicas behind the chosen router, one ingress.

Two ways in: `loraserve serve --ray-replicas N ...` (cli.py starts a Ray on loopback and runs this), and
`serve run loraserve.ray:build_app key=value ...` or a Serve config file's `import_path: loraserve.ray:build_app`
with `args:` against an existing cluster (docs/scale-out.md).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from loraserve.config import EngineConfig, LoRAConfig, option_fields
from loraserve.model.loader import DEFAULT_MODEL_NAME
from loraserve.ray.catalog import AdapterCatalog
from loraserve.ray.ingress import Ingress
from loraserve.ray.replica import EngineReplica
from loraserve.ray.router import ROUTERS
from loraserve.server.adapters import parse_lora_module
from loraserve.server.api import ServerSettings

APP_NAME = "loraserve"


@dataclass(frozen=True)
class ScaleOut:
    """How the application is spread: replicas, the CPUs each takes, how requests pick one."""

    replicas: int = 1
    cpus_per_replica: float = 1.0
    routing: str = "adapter-aware"  # | "multiplex" (Serve's default) | "round-robin"
    stats_period_s: float = 0.5  # how often replicas report residency and load to the router
    max_ongoing_requests: int = 1024  # per replica: Serve's cap; the engine queues beyond its batch itself

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1; got {self.replicas}")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"cpus_per_replica must be positive; got {self.cpus_per_replica}")
        if self.routing not in ROUTERS:
            raise ValueError(f"routing must be one of {', '.join(ROUTERS)}; got {self.routing!r}")


def _multiplexed(max_models: int) -> type[EngineReplica]:
    """A replica reporting adapters to Serve's multiplexing (an LRU of `max_models` per replica, the size
    of the engine's host cache), for the router Serve offers by default."""

    class MultiplexedEngineReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def use_adapter(self, key: str) -> str:
            return key

    return MultiplexedEngineReplica


def application(config: EngineConfig, settings: ServerSettings, scale: ScaleOut) -> Application:
    catalog = serve.deployment(AdapterCatalog, name="AdapterCatalog", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}).bind(settings.lora_modules)
    replica = EngineReplica if scale.routing != "multiplex" else _multiplexed(config.lora.max_cpu_loras)
    router = RequestRouterConfig(request_router_class=ROUTERS[scale.routing],
                                 request_routing_stats_period_s=scale.stats_period_s,
                                 request_routing_stats_timeout_s=max(10 * scale.stats_period_s, 5.0))
    threads = str(max(1, int(scale.cpus_per_replica)))
    replicas = serve.deployment(
        replica, name="EngineReplica", num_replicas=scale.replicas, max_ongoing_requests=scale.max_ongoing_requests,
        ray_actor_options={"num_cpus": scale.cpus_per_replica,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads}}},
        health_check_period_s=2.0, request_router_config=router,
    ).bind(config, settings, catalog)
    # The router runs in the ingress and asks replicas for their queue length before routing; a replica whose
    # cores are busy decoding answers in tens of milliseconds, not Serve's default deadline of 0.1 s.
    router_env = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "2"}
    return serve.deployment(Ingress, name="Ingress", max_ongoing_requests=100_000,
                            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": router_env}},
                            ).bind(settings, replicas, catalog)


_SERVER_KEYS = {"served_model_name", "lora_modules", "api_key", "allow_runtime_lora_updating"}
_SCALE_KEYS = {"replicas", "cpus_per_replica", "routing", "stats_period_s", "max_ongoing_requests"}


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder. `args`: the engine options by name (as `LLM(...)` takes them: model,
    dtype, enable_lora, max_loras, ...), the server's (served_model_name, lora_modules as `name=path` items,
    api_key, allow_runtime_lora_updating) and ScaleOut's fields. From `serve run` every value is a string;
    from a config file, YAML values."""
    args = dict(args)
    kinds = {f.name: f.metadata["kind"] for cls in (EngineConfig, LoRAConfig) for f in option_fields(cls)}
    unknown = set(args) - set(kinds) - _SERVER_KEYS - _SCALE_KEYS
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; valid: "
                         f"{', '.join(sorted(set(kinds) | _SERVER_KEYS | _SCALE_KEYS))}")
    scale = ScaleOut(**{k: _typed(ScaleOut.__dataclass_fields__[k].type, args.pop(k)) for k in _SCALE_KEYS & set(args)})
    names = _words(args.pop("served_model_name", None))
    modules = [parse_lora_module(item) for item in _words(args.pop("lora_modules", None))]
    settings_args = {"api_key": args.pop("api_key", None),
                     "allow_runtime_lora_updating": _typed("bool", args.pop("allow_runtime_lora_updating", False))}
    options = {k: _typed(kinds[k], v) for k, v in args.items()}
    if modules and "enable_lora" not in options:
        options["enable_lora"] = True
    config = EngineConfig.from_options(**options)
    settings = ServerSettings(served_model_names=names or [config.model or DEFAULT_MODEL_NAME], lora_modules=modules,
                              **settings_args)
    return application(config, settings, scale)


def _words(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _typed(kind: Any, value: Any) -> Any:
    """A `serve run` string as the option's type (a config file's values are typed already)."""
    if not isinstance(value, str):
        return value
    if kind in (None, bool, "bool"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false; got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return kind(value) if callable(kind) else value
