"""lorakit generate [--adapter DIR] [--model M] PROMPT"""

from __future__ import annotations

from lorakit.commands._common import add_generation_args, add_model_args, generation_settings


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate a reply with a base model (+ adapter)",
                                   description="Generate a reply to PROMPT, streaming tokens to the terminal. "
                                               "Instruct models get the prompt through their chat template.")
    parser.add_argument("prompt", metavar="PROMPT")
    add_model_args(parser)
    add_generation_args(parser)
    parser.add_argument("--raw", action="store_true", help="send PROMPT verbatim (no chat template)")
    parser.set_defaults(func=run)


def _check_text(text: str | None, what: str) -> None:
    """A terminal in a non-UTF-8 locale (or Latin-1 bytes) reaches Python as lone surrogates,
    which no tokenizer encodes: say so in one line before loading the model."""
    from lorakit.errors import LorakitError, lone_surrogate_at

    position = lone_surrogate_at(text or "")
    if position is not None:
        raise LorakitError(f"the {what} is not valid UTF-8 text (byte or lone surrogate at position {position}); "
                           f"pass UTF-8 text")


def run(args) -> int:
    from lorakit.inference.generate import generate, load_for_inference

    _check_text(args.prompt, "prompt")
    _check_text(args.system, "--system text")
    settings = generation_settings(args)
    model, tokenizer = load_for_inference(args.adapter, args.model, args.dtype)
    generate(model, tokenizer, args.prompt, settings, system=args.system, raw=args.raw, stream=True)
    return 0
