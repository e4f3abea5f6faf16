"""lorakit adapters list DIR | diff A B | check DIR [--base MODEL]: manage a folder of adapters.

The logic lives in lorakit.inference (adapter_tools, adapter_diff, adapter_check); this module
parses and prints.
"""

from __future__ import annotations

from lorakit.commands._common import format_table

HELP = "list, compare and check adapter directories"


def register(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help=HELP, description=HELP + " (from their files; only "
                                   "'check --base' loads a model)")
    commands = parser.add_subparsers(dest="adapters_command", metavar="SUBCOMMAND", required=True)

    listing = commands.add_parser("list", help="every adapter under a folder, as a table",
                                  description="Every adapter under DIR (recursive: directories with an "
                                              "adapter_config.json): method, rank, targets, base model and its "
                                              "fingerprint, size, and eval loss (metrics.jsonl or model card).")
    listing.add_argument("directory", metavar="DIR")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)

    diff = commands.add_parser("diff", help="how two adapters differ: config and per-module weight distance",
                               description="Config keys whose values differ, then per adapted module the norms "
                                           "of both weight updates, ||ΔW_A - ΔW_B||_F and their cosine "
                                           "similarity (from the low-rank factors), largest distance first.")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    diff.add_argument("--top", type=int, default=None, metavar="N", help="show only the N most different modules")
    diff.add_argument("--json", action="store_true", help="print JSON instead of tables")
    diff.set_defaults(func=run_diff)

    check = commands.add_parser("check", help="check adapter files (exit 1 with one line per problem)",
                                description="Files complete, config valid, tensors finite, shapes consistent "
                                            "(A's rows == B's columns == r per module); with --base also that the "
                                            "adapter's base fingerprint matches MODEL and that it loads onto it. "
                                            "DIR may be one adapter or a folder of adapters.")
    check.add_argument("directory", metavar="DIR")
    check.add_argument("--base", metavar="MODEL", help="base model to check against: HF dir, hub id, .gguf or "
                                                       "built-in alias")
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype to load --base in (default: float32)")
    check.set_defaults(func=run_check)


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def run_list(args) -> int:
    import json

    from lorakit.inference.adapter_tools import list_adapters

    rows = list_adapters(args.directory)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no adapters under {args.directory} (no adapter_config.json found)")
        return 0
    table = [[row["path"], row["method"] or "(unreadable)", ",".join(map(str, row["ranks"])) or "-",
              ",".join(row["targets"]) or "-", row["base"] or "-", (row["fingerprint"] or "-")[:8],
              "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 2**20:.2f} MiB",
              _number(row["eval_loss"])] for row in rows]
    print(format_table(["ADAPTER", "METHOD", "RANK", "TARGETS", "BASE", "BASE FP", "SIZE", "EVAL LOSS"], table))
    for row in rows:
        if row["error"]:
            print(f"{row['path']}: {row['error']}")
    return 0


def run_diff(args) -> int:
    import json

    from lorakit.inference.adapter_diff import diff_adapters

    result = diff_adapters(args.a, args.b)
    modules = result["modules"][:args.top] if args.top is not None else result["modules"]
    if args.json:
        print(json.dumps({"config": [list(c) for c in result["config"]], "modules": modules}, indent=2, default=str))
        return 0
    print(f"A: {args.a}\nB: {args.b}\n")
    if result["config"]:
        print("config differences:")
        print(format_table(["KEY", "A", "B"], [[k, json.dumps(va, default=str), json.dumps(vb, default=str)]
                                              for k, va, vb in result["config"]]))
    else:
        print("configs are identical")
    print(f"\nweight updates ({len(result['modules'])} modules, largest distance first):")
    print(format_table(["MODULE", "||ΔW_A||", "||ΔW_B||", "||ΔW_A-ΔW_B||", "COSINE", "NOTE"],
                       [[r["module"], _number(r["norm_a"]), _number(r["norm_b"]), _number(r["distance"]),
                         _number(r["cosine"]), r["note"]] for r in modules]))
    return 0


def run_check(args) -> int:
    from pathlib import Path

    from lorakit.inference.adapter_check import check_adapter
    from lorakit.inference.adapter_tools import find_adapters
    from lorakit.models.fingerprint import adapter_base
    from lorakit.models.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

    root = Path(args.directory)
    targets = [root]
    if root.is_dir() and not any((root / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)):
        targets = find_adapters(root) or [root]  # a folder of adapters: check each
    base_model = None
    if args.base:
        from lorakit.models.load import load_model

        base_model, _ = load_model(args.base, dtype=args.dtype)
    failed = 0
    for directory in targets:
        problems = check_adapter(directory, base_model, args.base)
        for problem in problems:
            print(problem)
        if problems:
            failed += 1
        elif base_model is None:
            print(f"{directory}: ok")
        elif adapter_base(directory) is None:
            print(f"{directory}: ok (loads on {args.base}; no base fingerprint recorded, only the name compared)")
        else:
            print(f"{directory}: ok (base {args.base} matches)")
    return 1 if failed else 0
