"""Small helpers shared by the subcommands (no heavy imports here)."""

from __future__ import annotations

import argparse


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("lorakit")
    except PackageNotFoundError:
        return "unknown"


def add_model_args(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument("--adapter", required=adapter_required, metavar="DIR",
                        help="adapter directory (peft layout)" + ("" if adapter_required else
                                                                  "; omit to use the bare base model"))
    parser.add_argument("--model", metavar="M", help="base model: HF dir, hub id, .gguf or built-in alias "
                        "(default: the adapter's base_model_name_or_path, else smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the base weights (default: float32)")


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--system", default=None, help="system message for chat models")


def generation_settings(args):
    from lorakit.errors import LorakitError
    from lorakit.inference.generate import GenerationSettings

    if args.max_new_tokens < 1:
        raise LorakitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LorakitError("--temperature must be >= 0 and --top-p in (0, 1]")
    return GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows under headers, each column as wide as its widest cell (two spaces between columns)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [headers, *rows]]
    return "\n".join(lines)
