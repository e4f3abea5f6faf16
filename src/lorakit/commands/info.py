"""lorakit info DIR: what an adapter is, without loading its base model."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="describe an adapter directory",
                                   description="Method, rank(s), target modules, trainable parameters, size "
                                               "on disk and base model of an adapter directory.")
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from lorakit.inference.info import adapter_info

    info = adapter_info(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ranks = ", ".join(str(r) for r in info["ranks"]) or "n/a (not a low-rank method)"
    alpha = f" (lora_alpha {info['lora_alpha']})" if info["lora_alpha"] is not None else ""  # none: not LoRA
    lines = [
        f"adapter:           {info['directory']}",
        f"method:            {info['method']} (peft_type {info['peft_type']})",
        f"base model:        {info['base_model']}" + (f" (fingerprint {info['base_fingerprint']})"
                                                     if info["base_fingerprint"] else ""),
        f"rank(s):           {ranks}{alpha}",
        f"targets:           {', '.join(info['targets']) or 'n/a'} ({info['adapted_modules']} modules)",
        f"trainable params:  {info['trainable_params']:,}",
        f"size on disk:      {info['size_bytes'] / 2**20:.2f} MiB ({info['size_bytes']:,} bytes)",
    ]
    if info.get("extra"):
        lines += [f"{key + ':':<19}{value}" for key, value in info["extra"].items()]
    print("\n".join(lines))
    return 0
