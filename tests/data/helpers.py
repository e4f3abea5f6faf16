"""Writers for data files in every supported container, shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.data import IGNORE_INDEX


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def write_container(tmp_path: Path, kind: str, rows: list[dict]) -> str:
    """Write ``rows`` as kind in {jsonl, json, csv, parquet, dir}; return the path."""
    import datasets

    if kind == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if kind == "json":
        (tmp_path / "data.json").write_text(json.dumps(rows))
        return str(tmp_path / "data.json")
    dataset = datasets.Dataset.from_list(rows)
    if kind == "csv":
        dataset.to_csv(str(tmp_path / "data.csv"), index=False)
        return str(tmp_path / "data.csv")
    if kind == "parquet":
        dataset.to_parquet(str(tmp_path / "data.parquet"))
        return str(tmp_path / "data.parquet")
    dataset.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def labelled_runs(sample: dict) -> list[list[int]]:
    """Contiguous runs of labelled token ids; also asserts labels are ids or -100."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        assert label in (token, IGNORE_INDEX)
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    return runs + ([current] if current else [])
