"""lorakit merge --adapter DIR --output DIR [--dtype] [--overwrite] [--force]: a merged transformers model directory."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="merge an adapter into its base and save a transformers model",
                                   description="Fold the adapter into the base weights (computed in fp32) and "
                                               "save model + tokenizer, loadable by AutoModelForCausalLM.")
    parser.add_argument("--adapter", required=True, metavar="DIR")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--model", metavar="M", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output (file or non-empty directory); the adapter and "
                             "a local base model are never overwritten")
    parser.add_argument("--force", action="store_true",
                        help="merge even when the adapter records another base model (its base fingerprint)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from lorakit.inference.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, model=args.model, dtype=args.dtype,
                       overwrite=args.overwrite, force=args.force)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(f"merged model written to {out} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0
