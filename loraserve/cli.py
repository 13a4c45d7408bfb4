"""Command line: `loraserve serve [MODEL]`, `loraserve prepare [MODEL]`, `loraserve generate`."""
from __future__ import annotations

import argparse
import sys

from loraserve.model.loader import resolve_model


def _prepare(args: argparse.Namespace) -> None:
    print(resolve_model(args.model))


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
