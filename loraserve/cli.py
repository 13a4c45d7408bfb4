"""Command line: `loraserve serve [MODEL]`, `loraserve prepare [MODEL]`, `loraserve generate`."""
from __future__ import annotations

import argparse
import os
import sys

from loraserve.model.loader import resolve_model


def _prepare(args: argparse.Namespace) -> None:
    from loraserve.layers.cpu_kernels import build_all

    print(resolve_model(args.model))
    for name, built in build_all().items():
        print(f"C++ {name}:", "built" if built else "unavailable (PyTorch path)")


def _generate(args: argparse.Namespace) -> None:
    from loraserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype)
    outputs = llm.chat([[{"role": "user", "content": prompt}] for prompt in args.prompt],
                       SamplingParams(temperature=0, max_tokens=args.max_tokens))
    for prompt, output in zip(args.prompt, outputs):
        print(f"> {prompt}\n{output.outputs[0].text}\n")


def _merge(args: argparse.Namespace) -> None:
    from loraserve.lora.merge import merge_adapter

    print(merge_adapter(args.model, args.adapter, args.out))


def _serve(args: argparse.Namespace) -> None:
    import logging

    from loraserve.config import EngineConfig, LoRAConfig
    from loraserve.engine.async_engine import AsyncLLMEngine
    from loraserve.model.loader import DEFAULT_MODEL_NAME
    from loraserve.server.api import ServerSettings, run_server
    from loraserve.server.protocol import APIError

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            kv_cache_memory_gb=args.kv_cache_memory_gb, seed=args.seed, enable_lora=args.enable_lora,
            lora=LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                            max_cpu_loras=args.max_cpu_loras, lora_dtype=args.lora_dtype))
        if args.lora_modules and not args.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        engine = AsyncLLMEngine.from_config(config)
    except ValueError as e:  # LoRAError and ModelNotFoundError included: the message says what to change
        sys.exit(f"loraserve serve: {e}")
    settings = ServerSettings(served_model_names=args.served_model_name or [args.model or DEFAULT_MODEL_NAME],
                              lora_modules=args.lora_modules or [], api_key=args.api_key,
                              allow_runtime_lora_updating=args.allow_runtime_lora_updating)
    try:
        run_server(engine, settings, args.host, args.port, args.shutdown_timeout, args.log_level)
    except (ValueError, APIError) as e:  # a --lora-modules adapter that cannot be served stops start-up
        sys.exit(f"loraserve serve: {e}")


def _lora_module(text: str):
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
    serve.add_argument("model", nargs="?", default=None,
                       help="HF folder, hub id in the local cache, or .gguf; default SmolLM2-135M-Instruct")
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
    eng = serve.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32 (default: %(default)s)")
    eng.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                     "at most 4096)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch (default: %(default)s)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=512,
                     help="tokens per engine step; longer prompts are prefilled in chunks (default: %(default)s)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: %(default)s)")
    eng.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from "
                     "--kv-cache-memory-gb or free memory)")
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None, help="memory for the KV cache")
    eng.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    lora = serve.add_argument_group("LoRA")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    lora.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None, metavar="ITEM",
                      help="adapters to serve, each name=path or a JSON object "
                           "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; each is validated at "
                           "start-up and a bad one stops the server with the reason")
    lora.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (default: %(default)s)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: %(default)s)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in host memory (default: --max-loras)")
    lora.add_argument("--lora-dtype", default="auto", help="adapter weight dtype (default: the model's)")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter; off by default "
                           "because it lets API clients make the server read any local path")
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="resolve (and convert, once) a model; print its folder")
    prepare.add_argument("model", nargs="?", default=None, help="HF folder, hub id, .gguf; default SmolLM2-135M")
    prepare.set_defaults(func=_prepare)
    generate = commands.add_parser("generate", help="greedy chat replies to prompts, offline")
    generate.add_argument("prompt", nargs="+")
    generate.add_argument("--model", default=None)
    generate.add_argument("--dtype", default="auto")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.set_defaults(func=_generate)
    merge = commands.add_parser("merge", help="fold a PEFT LoRA adapter into the base weights; save a model folder")
    merge.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder or hub id")
    merge.add_argument("--out", required=True, help="new output folder")
    merge.set_defaults(func=_merge)
    _add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
