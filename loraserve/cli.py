"""Command line: `loraserve serve [MODEL]`, `loraserve prepare [MODEL]`, `loraserve generate`, `loraserve merge`,
`loraserve inspect ADAPTER`.

The engine flags are made from the config dataclasses' fields (loraserve.config), so every engine option
is a flag with the same name, default and help as the `LLM(...)` keyword."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from loraserve.config import EngineConfig, LoRAConfig, option_fields
from loraserve.model.loader import DEFAULT_MODEL_NAME, resolve_model


def add_engine_arguments(parser: argparse.ArgumentParser, model_positional: bool, lora_only: bool = False) -> None:
    """One flag per EngineConfig / LoRAConfig field (--max-num-seqs for max_num_seqs); the model is a
    positional argument or --model. `lora_only`: the LoRAConfig fields alone."""
    for cls, title in ((EngineConfig, "engine"), (LoRAConfig, "LoRA"))[1 if lora_only else 0:]:
        group = parser.add_argument_group(title)
        for option in option_fields(cls):
            kind, doc = option.metadata["kind"], option.metadata["help"]
            if option.name == "model":
                if model_positional:
                    group.add_argument("model", nargs="?", default=None, help=doc)
                else:
                    group.add_argument("--model", default=None, help=doc)
            elif kind is None:  # a switch: --x, and --no-x where it is on by default
                action = argparse.BooleanOptionalAction if option.default else "store_true"
                group.add_argument(f"--{option.name.replace('_', '-')}", action=action, default=option.default,
                                   help=doc)
            else:
                group.add_argument(f"--{option.name.replace('_', '-')}", type=kind, default=option.default,
                                   help=f"{doc} (default: %(default)s)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = [option.name for cls in (EngineConfig, LoRAConfig) for option in option_fields(cls)]
    return EngineConfig.from_options(**{name: getattr(args, name) for name in names})


def _prepare(args: argparse.Namespace) -> None:
    from loraserve.layers.cpu_kernels import build_all

    print(resolve_model(args.model))
    for name, built in build_all().items():
        print(f"C++ {name}:", "built" if built else "unavailable (PyTorch path)")


def _generate(args: argparse.Namespace) -> None:
    from loraserve.llm import LLM
    from loraserve.sampling_params import SamplingParams

    llm = LLM.from_config(engine_config(args))
    outputs = llm.chat([[{"role": "user", "content": prompt}] for prompt in args.prompt],
                       SamplingParams(temperature=0, max_tokens=args.max_tokens))
    for prompt, output in zip(args.prompt, outputs, strict=True):
        print(f"> {prompt}\n{output.outputs[0].text}\n")


def _merge(args: argparse.Namespace) -> None:
    from loraserve.lora.merge import merge_adapter

    print(merge_adapter(args.model, args.adapter, args.out, dequantize=args.dequantize))


def _inspect(args: argparse.Namespace) -> None:
    import json

    from loraserve.errors import LoRAError
    from loraserve.lora.report import inspect_adapter

    options = {option.name: getattr(args, option.name) for option in option_fields(LoRAConfig)}
    try:
        report = inspect_adapter(args.adapter, args.model, LoRAConfig(**options))
    except (LoRAError, ValueError) as e:
        sys.exit(f"loraserve inspect: {e}")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:24s} {json.dumps(value) if isinstance(value, (dict, list)) else value}")


def _serve(args: argparse.Namespace) -> None:
    from loraserve.engine.async_engine import AsyncLLMEngine
    from loraserve.server.api import ServerSettings, run_server
    from loraserve.server.logs import configure_logging
    from loraserve.server.policy import Limits, Tenants

    configure_logging(args.log_level, args.log_format)
    try:
        config = engine_config(args)
        if args.lora_modules and not config.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        settings = ServerSettings(
            served_model_names=args.served_model_name or [args.model or DEFAULT_MODEL_NAME],
            lora_modules=args.lora_modules or [], api_key=args.api_key, api_keys_file=args.api_keys_file,
            allow_runtime_lora_updating=args.allow_runtime_lora_updating,
            lora_roots=tuple(args.lora_roots or ()), allow_lora_bin=args.allow_lora_bin,
            limits=Limits(args.max_body_bytes, args.max_prompts_per_request, args.max_stop_strings,
                          args.max_stop_length, args.max_prompt_tokens, args.max_waiting_requests or None,
                          args.max_concurrency_per_key))
        Tenants(settings.api_key, settings.api_keys_file)  # a keys file that does not parse stops start-up
        engine = None if args.ray_replicas else AsyncLLMEngine.from_config(config)
    except ValueError as e:  # a config, model, keys file or adapter problem: the message says what to change
        sys.exit(f"loraserve serve: {e}")
    if args.ray_replicas:
        _serve_on_ray(args, config, settings)
        return
    try:
        status = run_server(engine, settings, args.host, args.port, args.shutdown_timeout, args.log_level,
                            args.log_format)
    except ValueError as e:  # a --lora-modules adapter that cannot be served (LoRAError) stops start-up
        engine.shutdown()
        sys.exit(f"loraserve serve: {e}")
    sys.exit(status)


def _serve_on_ray(args: argparse.Namespace, config, settings) -> None:
    if args.ray_address is None:  # a Ray of its own: every Ray process binds 127.0.0.1 (read as Ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from loraserve.ray.app import ScaleOut
        from loraserve.ray.launch import run
    except ImportError as e:
        sys.exit(f"loraserve serve: --ray-replicas needs Ray Serve ({e}); pip install 'loraserve[ray]'")
    try:
        scale = ScaleOut(args.ray_replicas, args.ray_cpus_per_replica, args.ray_routing)
        resolve_model(config.model)  # convert the model once here, not in every replica at once
        run(config, settings, scale, args.host, args.port, args.ray_address)
    except (ValueError, RuntimeError) as e:  # a bad option; the application failed to deploy (Serve's reason)
        sys.exit(f"loraserve serve: {e}")


def _lora_module(text: str) -> Any:
    from loraserve.server.adapters import parse_lora_module

    try:
        return parse_lora_module(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, adapters by model name)",
        description="Serve MODEL over an OpenAI-compatible HTTP API. Requests choose an adapter by putting its "
                    "name in the 'model' field; the base model's name selects no adapter.")
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for all interfaces "
                     "(default: %(default)s)")
    net.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    net.add_argument("--served-model-name", nargs="+", default=None,
                     help="name(s) clients use for the base model; the first is reported (default: MODEL)")
    net.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LORASERVE_API_KEY)")
    net.add_argument("--shutdown-timeout", type=float, default=3.0,
                     help="seconds in-flight requests may finish after SIGTERM/SIGINT before they are "
                          "aborted (default: %(default)s)")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    net.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="json: one JSON object per log line; a refused or failed request's line carries its "
                          "status, reason, tenant and error id as fields (default: %(default)s)")
    net.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None, metavar="ITEM",
                     help="adapters to serve, each name=path or a JSON object "
                          "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; each is validated at "
                          "start-up and a bad one stops the server with the reason")
    net.add_argument("--allow-runtime-lora-updating", action="store_true",
                     help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter; off by default "
                          "because it lets API clients make the server read any local path")
    _add_policy_arguments(serve)
    ray = serve.add_argument_group("scale-out on Ray Serve (docs/scale-out.md; pip install 'loraserve[ray]')")
    ray.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                     help="serve with N engine replicas behind one ingress on Ray Serve, requests routed to the "
                          "replica holding their adapter; 0: one process, no Ray (default: %(default)s)")
    ray.add_argument("--ray-address", default=None,
                     help="an existing Ray cluster to join (e.g. auto, or ray://head:10001); default: start a Ray "
                          "of its own on 127.0.0.1")
    ray.add_argument("--ray-cpus-per-replica", type=float, default=1.0, help="(default: %(default)s)")
    ray.add_argument("--ray-routing", default="adapter-aware", choices=["adapter-aware", "multiplex", "round-robin"],
                     help="how a request picks a replica: by where its adapter is resident (slot, then host memory, "
                          "then load), Serve's multiplexed-model routing, or in turn (default: %(default)s)")
    add_engine_arguments(serve, model_positional=True)
    serve.set_defaults(func=_serve)


def _add_policy_arguments(serve: argparse.ArgumentParser) -> None:
    """Tenants, adapter sources and limits (docs/security.md)."""
    from loraserve.server.policy import Limits

    limits = Limits()
    group = serve.add_argument_group("security and limits (docs/security.md)")
    group.add_argument("--api-keys-file", default=None, metavar="FILE",
                       help='JSON object mapping each API key to what it may do: {"KEY": {"adapters": ["support-*"], '
                            '"max_concurrency": 8, "tenant": "support"}}; a key sees, uses, loads and unloads only '
                            "the adapters its names or globs match (every key may use the base model); re-read on "
                            "SIGHUP")
    group.add_argument("--lora-roots", nargs="+", default=None, metavar="DIR",
                       help="adapter folders (at start-up and loaded at run time) must resolve, after '..' and "
                            "symlinks, inside one of these directories (hub ids: from the local cache only); "
                            "default: any path the process can read")
    group.add_argument("--allow-lora-bin", action="store_true",
                       help="let runtime loads read legacy adapter_model.bin (a pickle: loading one can run code); "
                            "default: safetensors only")
    for flag, value, doc in (
            ("--max-body-bytes", limits.max_body_bytes, "largest request body; 413 above"),
            ("--max-prompts-per-request", limits.max_prompts, "prompts in one /v1/completions request"),
            ("--max-stop-strings", limits.max_stop, "entries of stop, and of stop_token_ids"),
            ("--max-stop-length", limits.max_stop_length, "characters of one stop string"),
            ("--max-prompt-tokens", limits.max_prompt_tokens, "tokens of one prompt (default: the context length)"),
            ("--max-waiting-requests", limits.max_waiting, "prompts accepted but not yet generating; more are "
             "answered 503 with Retry-After; 0: no limit"),
            ("--max-concurrency-per-key", limits.max_concurrency, "requests in flight per API key (a key's own "
             "max_concurrency overrides it); more are answered 429; default: no limit")):
        group.add_argument(flag, type=int, default=value, help=f"{doc} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="resolve (and convert, once) a model and build the C++ "
                                  "kernels; print the model's folder")
    prepare.add_argument("model", nargs="?", default=None, help="HF folder, hub id, .gguf; default SmolLM2-135M")
    prepare.set_defaults(func=_prepare)
    generate = commands.add_parser("generate", help="greedy chat replies to prompts, offline")
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--max-tokens", type=int, default=64)
    add_engine_arguments(generate, model_positional=False)
    generate.set_defaults(func=_generate)
    merge = commands.add_parser("merge", help="fold a PEFT LoRA adapter into the base weights; save a model folder")
    merge.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder or hub id")
    merge.add_argument("--out", required=True, help="new output folder")
    merge.add_argument("--dequantize", action="store_true",
                       help="for a quantized base (GPTQ, AWQ, compressed-tensors): write a de-quantized float "
                            "model with the adapter merged (without it, a quantized base is refused)")
    merge.set_defaults(func=_merge)
    inspect = commands.add_parser("inspect", help="what a PEFT adapter is and whether this engine serves it, "
                                  "without starting a server or loading the base weights")
    inspect.add_argument("adapter", help="PEFT adapter folder or hub id in the local cache")
    inspect.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    add_engine_arguments(inspect, model_positional=False, lora_only=True)
    inspect.set_defaults(func=_inspect)
    _add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
