"""Adapter management from the files alone (no base model loaded): find the adapters under a
folder and describe each one (``lorakit adapters list``), and the pieces ``adapter_diff`` and
``adapter_check`` share: an adapter's tensors grouped by adapted module.

An adapter is a directory with an adapter_config.json (peft's layout, any registered method);
training checkpoints (``checkpoint-N/``) and non-default adapters in subfolders are adapters too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lorakit.errors import LorakitError


def find_adapters(root: str | Path) -> list[Path]:
    """Every adapter directory at or under ``root`` (recursive), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise LorakitError(f"'{root}' is not a directory")
    return sorted(path.parent for path in root.rglob("adapter_config.json") if path.is_file())


def module_tables(tensors: dict[str, torch.Tensor], tables: frozenset[str]):
    """({module path: {table: tensor}}, {file key: tensor} of the rest) for an adapter's file
    tensors. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" is module
    "model.layers.0.self_attn.q_proj", table "lora_A"; keys with no table part (biases,
    modules_to_save copies, a prefix's embeddings) are the rest."""
    from lorakit._file_keys import FILE_PREFIX

    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parts = key.removeprefix(FILE_PREFIX).split(".")
        index = next((i for i, part in enumerate(parts) if part in tables and i > 0), None)
        if index is None:
            rest[key] = tensor
        else:
            modules.setdefault(".".join(parts[:index]), {})[parts[index]] = tensor
    return modules, rest


def eval_loss(directory: str | Path) -> float | None:
    """The adapter's final eval loss: the last eval row of its metrics.jsonl, else the model
    card's "final eval loss" line (README.md, written by lorakit train); None when neither has one."""
    directory = Path(directory)
    metrics = directory / "metrics.jsonl"
    if metrics.is_file():
        losses = []
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line of a killed run
                continue
            if isinstance(row, dict) and isinstance(row.get("eval_loss"), (int, float)):
                losses.append(float(row["eval_loss"]))
        if losses:
            return losses[-1]
    card = directory / "README.md"
    if card.is_file():
        found = re.search(r"final eval loss: ([0-9][0-9.eE+-]*)", card.read_text(encoding="utf-8", errors="replace"))
        if found:
            try:
                return float(found.group(1))
            except ValueError:
                return None
    return None


def list_adapters(root: str | Path) -> list[dict]:
    """One row per adapter under ``root``: {"path" (relative to root), "method", "ranks",
    "targets", "base", "fingerprint" (the recorded base's, 16 hex, or None), "size_bytes",
    "eval_loss", "error"}. An adapter that does not load (bad config, corrupt or non-finite
    tensors) is a row with "error" set, so one broken adapter does not hide the others."""
    from lorakit.inference.info import adapter_info
    from lorakit.models.fingerprint import adapter_base

    root = Path(root)
    rows = []
    for directory in find_adapters(root):
        row = {"path": str(directory.relative_to(root)) if directory != root else ".", "method": None, "ranks": [],
               "targets": [], "base": None, "fingerprint": None, "size_bytes": None,
               "eval_loss": eval_loss(directory), "error": None}
        try:
            info = adapter_info(directory)
            record = adapter_base(directory)
        except LorakitError as err:
            row["error"] = " ".join(str(err).split())
        else:
            row.update(method=info["method"], ranks=info["ranks"], targets=info["targets"], base=info["base_model"],
                       size_bytes=info["size_bytes"], fingerprint=record.fingerprint if record else None)
        rows.append(row)
    return rows
