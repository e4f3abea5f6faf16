"""Build a preference data set from Python's own documentation: for a standard-library function,
the chosen answer is the first sentence of its docstring, the rejected one the first sentence of
another function's docstring from the same module.

Why this data: the answers are real prose written by others (not rows we wrote), shipped with
every interpreter (built offline), and each pair has one right answer that differs from a
plausible wrong one in content, not in style, so a preference tuner has to learn what the
functions do.

    python examples/data/make_preference_data.py [--out-dir examples/data] [--eval-size 24]

writes OUT/docstring_pref_train.jsonl and OUT/docstring_pref_eval.jsonl, rows
{"prompt", "chosen", "rejected", "source"}. Rows are ordered by a hash of the function's name, so
two runs give the same files; the eval rows are the first of that order. The sentences depend on
the interpreter's version (docstrings change a little between releases).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

MODULES = ("base64", "bisect", "calendar", "colorsys", "copy", "difflib", "fnmatch", "functools", "glob", "gzip",
           "heapq", "html", "json", "keyword", "math", "operator", "os.path", "pprint", "random", "re", "shlex",
           "shutil", "statistics", "string", "tempfile", "textwrap", "urllib.parse", "zlib")
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def _order(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def first_sentence(doc: str | None) -> str | None:
    """The docstring's first sentence on one line, or None when it is missing, a bare signature
    line (C functions start with one), or too short / long to be an answer."""
    if not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    if re.match(r"^[\w.]+\(.*\)", paragraph):  # "name(args) -> result": a signature, not prose
        return None
    match = _SENTENCE.match(" ".join(paragraph.split()))
    sentence = match.group(1) if match else None
    return sentence if sentence and 25 <= len(sentence) <= 220 else None


def functions(module_name: str) -> list[tuple[str, str, str]]:
    """(qualified name, signature, first sentence) of the public functions defined in the module."""
    module = importlib.import_module(module_name)
    found = []
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        sentence = first_sentence(obj.__doc__)
        if sentence is None:
            continue
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = "(...)"
        found.append((f"{module_name}.{name}", signature if len(signature) <= 80 else "(...)", sentence))
    return found


def build(eval_size: int) -> tuple[list[dict], list[dict]]:
    rows = []
    for module_name in MODULES:
        found = functions(module_name)
        for i, (name, signature, sentence) in enumerate(found):
            # the rejected answer: another function of the same module with a different sentence
            others = [f for f in found if f[2] != sentence]
            if not others:
                continue
            other = min(others, key=lambda f: _order(name + "|" + f[0]))
            rows.append({"prompt": f"In one sentence, what does the Python function `{name}{signature}` do?",
                         "chosen": sentence, "rejected": other[2], "source": name})
    rows.sort(key=lambda row: _order(row["source"]))
    return rows[eval_size:], rows[:eval_size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--eval-size", type=int, default=24)
    args = parser.parse_args(argv)
    train, evaluation = build(args.eval_size)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("docstring_pref_train.jsonl", train), ("docstring_pref_eval.jsonl", evaluation)):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(train)} train / {len(evaluation)} eval pairs from {len(MODULES)} modules "
          f"(Python {sys.version.split()[0]}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
