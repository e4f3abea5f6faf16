"""``lorakit compare``: train every method on the same data with the same budget, one fresh
process each (worker.py), and write the report (report.py). A method that fails becomes a row
that says why; the others still run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lorakit.compare.entries import entries_for, entry_config


def _error_line(stderr: str, returncode: int) -> str:
    """The worker's one-line error, else the last line of its traceback."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else f"exit status {returncode}"


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return "unknown"
    seconds = sum(durations) / len(durations) * remaining
    return f"~{seconds / 60:.0f} min" if seconds >= 90 else f"~{seconds:.0f} s"


def run_entry(spec: dict, directory: Path) -> dict:
    """Run one worker process; its result row, or a failed row with the reason."""
    directory.mkdir(parents=True, exist_ok=True)
    spec_path = directory / "compare_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    with open(directory / "compare.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "lorakit.compare.worker", str(spec_path)],
                              stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(proc.stderr)
    if proc.returncode == 0:
        return json.loads(Path(spec["result"]).read_text())
    method = spec["config"]["method"]
    return {"name": spec["name"], "method": method, "status": "failed", "error": _error_line(proc.stderr, proc.returncode)}


def compare(config_path: str, overrides: list[str], names: list[str], output_dir: str,
            questions: list[dict] | None = None, say: Callable[[str], None] = print) -> dict:
    """Train each named entry (entries.py) and write results.json, report.md and report.html
    into ``output_dir``; return the results."""
    from lorakit import __version__
    from lorakit._io import check_directory_path, write_json_atomic
    from lorakit.compare.report import write_reports
    from lorakit.config import load_config
    from lorakit.hardware import probe_host

    config = load_config(config_path, overrides)  # one line now for a bad config, not eight failed rows
    config_dict = config.to_dict()
    entries = entries_for(config_dict, names)
    out = check_directory_path(output_dir, "--output")
    out.mkdir(parents=True, exist_ok=True)
    rows, durations = [], []
    for i, entry in enumerate(entries):
        say(f"compare [{i + 1}/{len(entries)}] {entry.name} (method {entry.method}): running; "
            f"ETA for the rest {_eta(durations, len(entries) - i)}")
        started = time.perf_counter()
        directory = out / entry.name
        spec = {"name": entry.name, "config": entry_config(config_dict, entry, str(directory)),
                "questions": questions or [], "result": str(directory / "compare_row.json")}
        row = run_entry(spec, directory)
        durations.append(time.perf_counter() - started)
        row["wall_s"] = durations[-1]
        rows.append(row)
        outcome = (f"eval loss {row['eval_loss_after']:.4f}" if row["status"] == "ok" and row.get("eval_loss_after")
                   is not None else row.get("error", row["status"]))
        say(f"compare [{i + 1}/{len(entries)}] {entry.name}: {row['status']} in {durations[-1]:.0f} s ({outcome})")
    results = {"config": str(config_path), "overrides": list(overrides), "model": config.model,
               "data": {"train": config.data.train, "eval": config.data.eval},
               "budget": {k: config_dict["train"].get(k) for k in ("epochs", "max_steps", "batch_size", "grad_accum",
                                                                   "seed", "precision")},
               "host": probe_host().summary(), "lorakit": __version__, "methods": rows}
    write_json_atomic(out / "results.json", results)
    write_reports(results, out)
    return results
