"""lorakit compare CONFIG.yaml [--methods a,b,...] [--output DIR] [--questions FILE] [key=value ...]"""

from __future__ import annotations

DEFAULT_METHODS = "lora,qlora,dora,adalora,full,prefix,adapter,prompt"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="train every method on the same data and budget; write a side-by-side report",
        description="Train each method with CONFIG.yaml's data, steps, seed and batch, each in a fresh process, "
                    "and write report.md, report.html and results.json: trainable parameters, peak memory, "
                    "time per step, size on disk, held-out loss before/after, exact-match answers.")
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated (default: {DEFAULT_METHODS}; also rslora, pissa)")
    parser.add_argument("--output", default="outputs/compare", help="report directory (default: outputs/compare)")
    parser.add_argument("--questions", default=None,
                        help="JSON list of {question, answer}: held-out questions for exact-match answers")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from lorakit.compare import compare
    from lorakit.errors import LorakitError

    questions = None
    if args.questions:
        try:
            questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise LorakitError(f"--questions {args.questions}: {err}") from None
        if not isinstance(questions, list) or not all(isinstance(q, dict) and {"question", "answer"} <= set(q)
                                                      for q in questions):
            raise LorakitError(f"--questions {args.questions}: expected a JSON list of {{\"question\", \"answer\"}}")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    results = compare(args.config, args.overrides, names, args.output, questions)
    failed = [r["name"] for r in results["methods"] if r["status"] != "ok"]
    print(f"report: {Path(args.output) / 'report.md'} and report.html ({len(results['methods']) - len(failed)} "
          f"methods ok" + (f", failed: {', '.join(failed)}" if failed else "") + ")")
    return 0
