"""lorakit export --adapter DIR --output F.gguf [--format gguf|gguf-adapter] [--quant f16|q8_0|q4_0]:
a GGUF for llama.cpp / Ollama, and a Modelfile next to it."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export to GGUF (merged model or LoRA adapter) with an Ollama "
                                                  "Modelfile",
                                   description="Write the merged model (--format gguf) or the adapter alone "
                                               "(--format gguf-adapter, llama.cpp's LoRA layout) as GGUF, with an "
                                               "Ollama Modelfile in the same folder. Llama, Mistral and Qwen2 "
                                               "models with byte-level BPE tokenizers.")
    parser.add_argument("--adapter", required=True, metavar="DIR")
    parser.add_argument("--output", required=True, metavar="FILE.gguf")
    parser.add_argument("--format", default="gguf", choices=["gguf", "gguf-adapter"],
                        help="gguf: merged model (default); gguf-adapter: the adapter for llama.cpp's --lora")
    parser.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0"],
                        help="weights of the merged model (default f16; gguf-adapter is always f32)")
    parser.add_argument("--model", metavar="M", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output and Modelfile")
    parser.add_argument("--force", action="store_true",
                        help="export even when the adapter records another base model (its base fingerprint)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.export.run import export

    result = export(args.adapter, args.output, fmt=args.format, quant=args.quant, model=args.model,
                    overwrite=args.overwrite, force=args.force)
    size = result.path.stat().st_size / 2**20
    what = f"{args.quant} model" if args.format == "gguf" else "LoRA adapter"
    print(f"{what} written to {result.path} ({size:.1f} MiB); Ollama: ollama create NAME -f {result.modelfile}")
    if result.template_note:
        print(f"note: the Modelfile has no TEMPLATE: {result.template_note}")
    return 0
