"""lorakit chat [--adapter DIR]: an interactive conversation that keeps its history."""

from __future__ import annotations

import sys

from lorakit.commands._common import add_generation_args, add_model_args, generation_settings

HELP = "commands: /reset clears the history, /exit (or end of input) quits"


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat interactively with a base model (+ adapter)",
                                   description=f"Read user turns from standard input, one per line; {HELP}.")
    add_model_args(parser)
    add_generation_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.inference.generate import generate, load_for_inference

    settings = generation_settings(args)
    model, tokenizer = load_for_inference(args.adapter, args.model, args.dtype)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            del history[1 if args.system else 0:]
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = generate(model, tokenizer, history, settings, stream=True)
        history.append({"role": "assistant", "content": reply})
