"""The layout's rules, checked on every run: floors import only downwards and the server only through
AsyncLLMEngine (import-linter contracts in pyproject.toml), no import cycles, and ruff is clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [["lint-imports", "--no-cache"], ["ruff", "check", "."]],
                         ids=["import-linter", "ruff"])
def test_tool_is_clean(command):
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_engine_options_are_one_list():
    """Every config field is an LLM keyword and a `serve` flag with the same default."""
    from loraserve.cli import build_parser, engine_config
    from loraserve.config import EngineConfig, LoRAConfig, option_fields

    defaults = build_parser().parse_args(["serve"])
    assert engine_config(defaults) == EngineConfig()
    flags = build_parser().parse_args(["serve", "m", "--max-n", "4", "--max-loras", "3", "--enable-lora",
                                       "--dtype", "float32", "--kv-cache-memory-gb", "0.5"])
    assert engine_config(flags) == EngineConfig.from_options(model="m", max_n=4, max_loras=3, enable_lora=True,
                                                             dtype="float32", kv_cache_memory_gb=0.5)
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for option in [*option_fields(EngineConfig), *option_fields(LoRAConfig)]:
        if option.name != "model":
            assert f"--{option.name.replace('_', '-')}" in serve_help, option.name
