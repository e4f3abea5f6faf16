"""benchmarks/data/make_stdlib_docstrings.py: valid chat rows of real docstrings, a disjoint split,
byte-identical output across runs."""

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.data.formats import detect_format, row_to_example

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "make_stdlib_docstrings.py"


def _build(out: Path, *args: str, hash_seed: str = "0") -> dict[str, bytes]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, str(SCRIPT), "--out-dir", str(out), *args], check=True, env=env,
                   capture_output=True, text=True)
    return {name: (out / name).read_bytes() for name in ("train.jsonl", "eval.jsonl", "meta.json")}


def _rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def _resolve(qualified: str):
    """The object named module.path.Name[.method], importing the longest module prefix."""
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
    raise AssertionError(f"cannot import {qualified}")


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two runs with --max-rows 50 under different hash seeds."""
    first = _build(tmp_path_factory.mktemp("a"), "--max-rows", "50", hash_seed="0")
    second = _build(tmp_path_factory.mktemp("b"), "--max-rows", "50", hash_seed="12345")
    return first, second


def test_rows_are_chat_samples_with_a_disjoint_split(built):
    files, _ = built
    train, evaluation = _rows(files["train.jsonl"]), _rows(files["eval.jsonl"])
    assert (len(train), len(evaluation)) == (48, 2)  # 5% of 50, rounded down
    for row in train + evaluation:
        assert detect_format(row, "row") == "chat"
        messages = row_to_example(row, "chat")
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert row["source"].rsplit(".", 1)[-1] in messages[0]["content"]
        assert 80 <= len(messages[1]["content"]) <= 1200
    assert not {r["source"] for r in train} & {r["source"] for r in evaluation}
    assert not {r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in evaluation}
    meta = json.loads(files["meta.json"])
    assert meta["python"] == sys.version and (meta["train_rows"], meta["eval_rows"]) == (48, 2)


def test_two_runs_give_identical_files(built):
    first, second = built
    assert first == second


def test_answers_are_the_real_docstrings(built):
    files, _ = built
    for row in _rows(files["train.jsonl"]) + _rows(files["eval.jsonl"]):
        doc = inspect.cleandoc(_resolve(row["source"]).__doc__)
        assert _words(row["messages"][1]["content"]).startswith(_words(doc.split("\n")[0])), row["source"]


def test_json_dumps_answer_starts_with_its_docstring(tmp_path):
    import json as json_module

    rows = _rows(_build(tmp_path, "--modules", "json", "--eval-size", "0")["train.jsonl"])
    (row,) = [r for r in rows if r["source"] == "json.dumps"]
    assert row["messages"][1]["content"].startswith(json_module.dumps.__doc__.split("\n")[0])
    assert "json.dumps" in row["messages"][0]["content"]
