"""Read rows from data files, each tagged with where it came from (for error messages).

JSONL is parsed here line by line so a bad row is reported with its 1-based line number;
a .json file holds a list of objects (or one key whose value is that list), or is JSON Lines
under a .json name; CSV, Parquet and saved dataset directories go through ``datasets``
and rows are reported by 1-based row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lorakit.errors import LorakitError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class BadRow(Exception):
    """A row that cannot be used; the message says why (without the location)."""


def read_rows(path: str) -> Iterator[tuple[str, dict | BadRow]]:
    """Yield (location, row) pairs; ``row`` is a BadRow when the row cannot be parsed.

    ``location`` is "FILE line N" for JSONL and "FILE row N" otherwise.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise LorakitError(f"data file '{path}' does not exist")
    if p.is_dir():
        yield from _read_dataset_dir(p, path)
    elif p.suffix == ".jsonl":
        yield from _read_jsonl(p, path)
    elif p.suffix == ".json":
        yield from _read_json(p, path)
    elif p.suffix in (".csv", ".parquet"):
        yield from _read_with_datasets(p, path)
    else:
        raise LorakitError(f"data file '{path}' has an unsupported type '{p.suffix}'; use one of "
                           f"{', '.join(SUFFIXES)} or a directory saved with datasets' save_to_disk")


def _object_or_bad(value) -> dict | BadRow:
    if isinstance(value, dict):
        return value
    return BadRow(f"expected a JSON object with named fields, got {type(value).__name__}")


def _read_jsonl(p: Path, name: str):
    with open(p, "rb") as handle:  # decoded line by line: a line that is not UTF-8 is one bad row
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield f"{name} line {number}", BadRow(f"not UTF-8 text (byte {err.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{name} line {number}", BadRow(f"malformed JSON ({err.msg} at column {err.colno})")
                continue
            yield f"{name} line {number}", _object_or_bad(value)


def _read_json(p: Path, name: str):
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LorakitError(f"{name}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines under a .json name
            yield from _read_jsonl(p, name)
            return
        raise LorakitError(f"{name} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                           f"fix the file") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists:
            value = lists[0]
        else:
            value = [value]
    if not isinstance(value, list):
        raise LorakitError(f"{name}: expected a JSON list of objects, got {type(value).__name__}")
    for number, row in enumerate(value, start=1):
        yield f"{name} row {number}", _object_or_bad(row)


def _read_with_datasets(p: Path, name: str):
    import datasets

    try:
        if p.suffix == ".csv":  # every cell a string ("42" stays "42"; an empty cell is "")
            with open(p, encoding="utf-8", newline="") as handle:
                header = next(csv.reader(handle), [])
            features = datasets.Features({name: datasets.Value("string") for name in header})
            dataset = datasets.Dataset.from_csv(str(p), keep_in_memory=True, features=features,
                                                keep_default_na=False)
        else:
            dataset = datasets.Dataset.from_parquet(str(p), keep_in_memory=True)
    except Exception as err:
        raise LorakitError(f"{name}: cannot be read as {p.suffix[1:]} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    yield from _dataset_rows(dataset, name)


def _read_dataset_dir(p: Path, name: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(p))
    except Exception as err:
        raise LorakitError(f"'{name}' is a directory but not a dataset saved with datasets' save_to_disk "
                           f"({type(err).__name__})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise LorakitError(f"'{name}' holds splits {', '.join(dataset)} but no 'train' split; "
                               f"save the split you want with Dataset.save_to_disk")
        dataset = dataset["train"]
    yield from _dataset_rows(dataset, name)


def _dataset_rows(dataset, name: str):
    for number, row in enumerate(dataset, start=1):
        yield f"{name} row {number}", row
