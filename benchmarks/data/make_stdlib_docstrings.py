"""Build a supervised fine-tuning set of question -> answer pairs from Python's own stdlib docstrings.

Why this data: a speed benchmark should train on real text, not on rows we wrote ourselves
(rows written for a test tend to be short and uniform), and it needs variable lengths so
padding, packing and truncation all do real work. The docstrings of the standard library are
real prose written by others, range from one paragraph to long reference notes (with code and
lists), and ship with every interpreter, so the set is built offline with no download. Each row
is a chat sample: the user asks about a function, class or method (the question template is
picked deterministically from the name), the assistant answers with its docstring. Only the
assistant answer is labelled (lorakit masks the prompt), so the trained tokens are the real text.

    python benchmarks/data/make_stdlib_docstrings.py --out-dir DIR [--max-rows N]
        [--eval-size N | --eval-fraction 0.05] [--max-chars 1200] [--min-chars 80] [--modules json ...]

writes DIR/train.jsonl and DIR/eval.jsonl (rows {"messages": [user, assistant], "source": name})
and DIR/meta.json. The output depends only on the interpreter (docstrings change between Python
versions and a little between platforms, e.g. os.path is posixpath or ntpath): its sys.version
and sys.platform are printed and recorded in meta.json. Rows are ordered by a hash of the object's
name (not the process's randomised hash()), so two runs give byte-identical files; the eval rows
are the first of that order, so the split is a fixed function of the names.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import statistics
import sys
from pathlib import Path

# Sorted; modules missing from the running interpreter are skipped and listed in meta.json.
MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code",
    "codecs", "collections", "collections.abc", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "ctypes", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.charset", "email.message",
    "email.policy", "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookiejar", "http.server",
    "imaplib", "importlib.metadata", "importlib.resources", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "logging.handlers", "lzma", "math", "mimetypes", "operator", "optparse", "os.path",
    "pathlib", "pdb", "pickle", "platform", "poplib", "pprint", "queue", "random", "re", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "traceback", "types",
    "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "weakref", "wsgiref.handlers",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "xmlrpc.server", "zipfile", "zipimport", "zlib",
    "zoneinfo",
)

FUNCTION_QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain the Python function `{name}{sig}`.",
    "I found a call to `{name}{sig}` in some code. What does it do?",
    "Describe `{name}` from the `{module}` module of the Python standard library.",
    "What is `{name}{sig}` documented to do?",
)
CLASS_QUESTIONS = (
    "What is the `{name}` class in Python?",
    "Explain the Python class `{name}{sig}`.",
    "What is `{name}` in the `{module}` module for?",
    "Describe the standard library class `{name}`.",
)
METHOD_QUESTIONS = (
    "What does the method `{name}` do?",
    "Explain `{name}{sig}`, a method of `{owner}` in `{module}`.",
    "In Python, what does calling `{name}{sig}` do?",
    "Describe the `{short}` method of `{owner}`.",
)
_MAX_SIGNATURE = 120
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")          # default values like <object at 0x7f...>
_STRUCTURED = re.compile(r"^(\s|>>>|\.\.\.|[-*+] |\d+[.)] |:|[=~^\-]{3,}$)")
_AUTO_SIGNATURE_DOC = re.compile(r"^[\w.]+\(.*\)$")   # dataclass-generated "Name(a: int, b: str)"


def _stable_index(text: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % n


def _signature(obj, is_method: bool) -> str | None:
    """``(a, b=1)`` without self/cls and without memory addresses; None if unknown or too long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if is_method and params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    text = _ADDRESS.sub("", str(sig))
    return text if len(text) <= _MAX_SIGNATURE else None


def clean_docstring(doc: str) -> str:
    """inspect.cleandoc, then each prose paragraph joined onto one line (docstrings are hard-wrapped);
    paragraphs with indentation, doctest, bullets, field lists or rules keep their lines."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc).replace("\r", ""))
    out = []
    for paragraph in paragraphs:
        lines = [line.rstrip() for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        if any(_STRUCTURED.match(line) for line in lines):
            out.append("\n".join(lines))
        else:
            out.append(" ".join(" ".join(line.split()) for line in lines))
    return "\n\n".join(out)


def cap_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` at a paragraph end, else a sentence end, else a line end
    or a space (never mid-word)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    floor = max_chars // 3
    # a paragraph that ends in ':' introduces what follows (often a code block): never end on it
    ends = [m.start() for m in re.finditer(r"\n\n", head) if not head[:m.start()].endswith(":")]
    cut = ends[-1] if ends and ends[-1] >= floor else -1
    if cut < floor:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
        cut = ends[-1] if ends and ends[-1] >= floor else -1
    if cut < floor:
        cut = max(head.rfind("\n"), head.rfind(" "))
    return text[:cut].rstrip() if cut > 0 else text[:max_chars]


def _defined_in(module, obj) -> bool:
    """Whether ``obj`` belongs to ``module``: defined in it, in a submodule (asyncio.events), or in its
    C accelerator (functools.reduce lives in _functools); not an alias of a builtin (typing.Text is str)."""
    home = getattr(obj, "__module__", None) or ""
    name = module.__name__
    return home in (name, "_" + name.rsplit(".", 1)[-1]) or home.startswith(name + ".")


def _public_names(module) -> list[str]:
    """``__all__`` when the module declares it, else the names in dir() without a leading underscore."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in dir(module) if not name.startswith("_")]
    return sorted(set(names))


def _methods(cls) -> list[tuple[str, object]]:
    """Public methods defined in ``cls`` itself (not inherited), as stored in its __dict__."""
    found = []
    for name in sorted(vars(cls)):
        if name.startswith("_"):
            continue
        raw = vars(cls)[name]
        func = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if inspect.isroutine(func):
            found.append((name, func))
    return found


def iter_documented(module_name: str):
    """(qualified name, kind, object, raw docstring) for the module's public functions and classes
    and the public methods of those classes; kind is function | class | method."""
    module = importlib.import_module(module_name)
    for name in _public_names(module):
        obj = getattr(module, name, None)
        qual = f"{module_name}.{name}"
        if not _defined_in(module, obj):
            continue
        if inspect.isclass(obj):
            yield qual, "class", obj, vars(obj).get("__doc__")
            for method_name, method in _methods(obj):
                yield f"{qual}.{method_name}", "method", method, getattr(method, "__doc__", None)
        elif inspect.isroutine(obj):
            yield qual, "function", obj, getattr(obj, "__doc__", None)


def make_question(qual: str, kind: str, obj, module_name: str) -> str:
    templates = {"function": FUNCTION_QUESTIONS, "class": CLASS_QUESTIONS, "method": METHOD_QUESTIONS}[kind]
    template = templates[_stable_index(qual, len(templates))]
    sig = _signature(obj, kind == "method") if "{sig}" in template else None
    owner, _, short = qual.rpartition(".")
    return template.format(name=qual, sig=sig or "", module=module_name, owner=owner, short=short)


def collect_rows(modules, min_chars: int, max_chars: int) -> tuple[list[dict], list[str], list[str]]:
    """(rows, modules used, modules missing); one row per object whose cleaned docstring has at least
    ``min_chars`` characters and was not seen before (re-exports and copied docstrings count once)."""
    rows, used, missing, seen_docs = [], [], [], set()
    seen_objects = {}  # id -> object: holding the object keeps its id from being reused
    for module_name in modules:
        try:
            documented = list(iter_documented(module_name))
        except ImportError:
            missing.append(module_name)
            continue
        used.append(module_name)
        for qual, kind, obj, doc in documented:
            if not isinstance(doc, str) or id(obj) in seen_objects:
                continue
            seen_objects[id(obj)] = obj
            text = clean_docstring(doc)
            if len(text) < min_chars or text in seen_docs or _AUTO_SIGNATURE_DOC.match(text):
                continue
            seen_docs.add(text)
            rows.append({"messages": [{"role": "user", "content": make_question(qual, kind, obj, module_name)},
                                      {"role": "assistant", "content": cap_text(text, max_chars)}],
                         "source": qual})
    return rows, used, missing


def split_rows(rows: list[dict], max_rows: int | None, eval_size: int | None,
               eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval): rows ordered by a hash of their source name, capped to ``max_rows``; the first
    ``eval_size`` (default: eval_fraction of the rows, at least 1) are the eval rows."""
    ordered = sorted(rows, key=lambda row: hashlib.sha256(row["source"].encode()).hexdigest())
    if max_rows is not None:
        ordered = ordered[:max_rows]
    n_eval = eval_size if eval_size is not None else max(1, int(len(ordered) * eval_fraction))
    if not 0 <= n_eval < len(ordered):
        sys.exit(f"error: an eval split of {n_eval} rows leaves no training rows out of {len(ordered)}; "
                 f"lower --eval-size / --eval-fraction or raise --max-rows")
    return ordered[n_eval:], ordered[:n_eval]


def char_stats(rows: list[dict]) -> dict:
    """min / median / max characters of the answers and of whole samples (question + answer)."""
    answers = [len(row["messages"][1]["content"]) for row in rows]
    totals = [sum(len(m["content"]) for m in row["messages"]) for row in rows]
    if not rows:
        return {}
    pick = lambda xs: {"min": min(xs), "median": int(statistics.median(xs)), "max": max(xs)}
    return {"answer_chars": pick(answers), "sample_chars": pick(totals)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="directory for train.jsonl, eval.jsonl and meta.json")
    parser.add_argument("--max-rows", type=int, default=None, help="cap on rows written (train + eval)")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out rows (default: --eval-fraction)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share when no --eval-size")
    parser.add_argument("--min-chars", type=int, default=80, help="skip docstrings shorter than this")
    parser.add_argument("--max-chars", type=int, default=1200, help="cut answers at a paragraph/sentence end")
    parser.add_argument("--modules", nargs="+", default=list(MODULES), help="stdlib modules to read")
    args = parser.parse_args(argv)

    rows, used, missing = collect_rows(sorted(args.modules), args.min_chars, args.max_chars)
    train, evaluation = split_rows(rows, args.max_rows, args.eval_size, args.eval_fraction)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", evaluation)
    meta = {"python": sys.version, "version_info": list(sys.version_info[:3]), "platform": sys.platform,
            "modules": used, "modules_missing": missing, "documented_objects": len(rows),
            "train_rows": len(train), "eval_rows": len(evaluation),
            "train": char_stats(train), "eval": char_stats(evaluation),
            "args": {k: v for k, v in vars(args).items() if k not in ("out_dir", "modules")}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    print(f"python {sys.version} on {sys.platform}")
    print(f"{len(used)} modules ({len(missing)} missing{': ' + ', '.join(missing) if missing else ''}), "
          f"{len(rows)} documented objects -> {len(train)} train / {len(evaluation)} eval rows")
    for split, stats in (("train", meta["train"]), ("eval", meta["eval"])):
        for key, s in stats.items():  # empty for an empty split
            print(f"  {split} {key}: min {s['min']} / median {s['median']} / max {s['max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
