"""The ``lorakit`` command: a thin parser over the library (see DESIGN.md).

Each subcommand lives in ``lorakit/commands/<name>.py`` with ``register(subparsers)``, which
adds its parser and sets ``func(args) -> int``. Modules import nothing heavy at import time,
so ``lorakit --help`` is fast; torch and transformers load inside ``func``. To add a command,
add its module name to ``COMMANDS``.

A LorakitError is printed as ``error: <message>`` on one line (exit status 2), Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.commands import _common

COMMANDS = ["train", "estimate", "compare", "generate", "chat", "eval", "merge", "export", "verify", "info", "adapters",
            "serve", "env"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning for causal language models, "
                                     "with peft-compatible adapter files.")
    parser.add_argument("--version", action="version", version=f"lorakit {_common.version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lorakit.commands.{name}").register(subparsers)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that key=value overrides may also follow an option
    (``lorakit train run.yaml --no-progress train.lr=1e-4``): argparse fills an nargs='*'
    positional once, so values after an option come back unrecognised; they join the overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only LorakitError is shown without a traceback
        from lorakit.errors import LorakitError

        if isinstance(err, LorakitError):
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
