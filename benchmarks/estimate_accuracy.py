"""How close ``lorakit estimate`` comes to a real run: predicted vs measured peak RSS and step time.

    python benchmarks/estimate_accuracy.py [--only lora-256,qlora-512] [--steps 4]
                                           [--big-model DIR] [--json PATH]

Rows: the built-in SmolLM2-135M-Instruct with LoRA (r=16 on all 7 linear layers), QLoRA (the same
over an NF4 base) and full fine-tuning, each at sequence length 256 and 512 (batch 4), plus the
~3B Llama-architecture model with QLoRA when ``--big-model`` names its directory (written by
``benchmarks/make_big_model.py``; the row is left out when the directory does not exist).

Method. The data is plain text rows longer than the sequence length (words drawn from a seeded
list), so every sample is cut to exactly T tokens and every micro-batch has the same shape:
the largest batch the estimate sizes is every batch the run sees. Each row runs two fresh
processes: ``lorakit estimate CONFIG --json`` (the prediction, made before any weight loads), and
``lorakit train CONFIG train.skip_estimate=true`` for --steps optimizer steps (no evaluation),
whose peak RSS is its own ru_maxrss (``os.wait4``) and whose step time is the median of the
steps after the first (metrics.jsonl's elapsed_s differences; the first includes warm-up).
Precision is pinned to fp32 for LoRA / full and compute_dtype to float32 for QLoRA, so a host's
bf16 choice does not change what is compared. Errors are (predicted - measured) / measured.
Targets (issue 11): peak within 15%, step time within 25%.

Duration: about a minute per built-in row on a 2-core host (the full rows longer); the 3B row
needs about 4 GB of memory and several minutes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BUILTIN = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(big_model: str | None) -> dict[str, dict]:
    rows = {}
    for seq in (256, 512):
        rows[f"lora-{seq}"] = {"model": BUILTIN, "method": "lora", "seq": seq}
        rows[f"qlora-{seq}"] = {"model": BUILTIN, "method": "qlora", "seq": seq}
        rows[f"full-{seq}"] = {"model": BUILTIN, "method": "full", "seq": seq}
    if big_model and Path(big_model).is_dir():
        rows["3b-qlora-256"] = {"model": big_model, "method": "qlora", "seq": 256, "batch": 1}
    return rows


def _write_text_data(path: Path, rows: int, words_per_row: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocabulary = ["memory", "adapter", "weights", "token", "gradient", "kernel", "matrix", "layer", "batch",
                  "shard", "process", "model", "train", "estimate", "peak", "step", "rank", "value", "data",
                  "time", "the", "of", "a", "to", "and", "in", "is", "for", "on", "with"]
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words_per_row))}) + "\n")
    return path


def _config(row: dict, data: Path, out: Path, steps: int) -> dict:
    lora = {"r": 16, "lora_alpha": 32, "target_modules": TARGETS}
    if row["method"] == "qlora":
        lora["compute_dtype"] = "float32"
    if row["method"] == "full":
        lora = {}
    return {"model": row["model"], "method": row["method"], "lora": lora,
            "data": {"train": str(data), "max_seq_len": row["seq"], "format": "text"},
            "train": {"batch_size": row.get("batch", 4), "max_steps": steps, "precision": "fp32", "lr": 1e-4,
                      "logging_steps": 1},
            "output_dir": str(out)}


def _run_child_with_rusage(command: list[str]) -> tuple[int, str, int]:
    """(exit code, stdout, peak RSS bytes) of a fresh process, reaped here so that its own
    ru_maxrss is read (Linux reports KiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(err.read()[-2000:], file=sys.stderr)
        return code, out.read(), usage.ru_maxrss * 1024


def _measured_step_s(output_dir: Path) -> float:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows if "elapsed_s" in row]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return statistics.median(steps) if steps else elapsed[0]


def run_row(name: str, row: dict, work: Path, steps: int, measured: dict | None = None) -> dict:
    """Predict and measure one row; with ``measured`` (a row of an earlier --json), predict only
    and compare with what that run measured."""
    data = _write_text_data(work / f"{name}.jsonl", rows=4 * row.get("batch", 4) * steps,
                            words_per_row=row["seq"] * 2)
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(_config(row, data, work / name, steps)))
    cli = [sys.executable, "-m", "lorakit.cli"]
    code, stdout, _ = _run_child_with_rusage(cli + ["estimate", str(config_path), "--json"])
    if code not in (0, 1):
        raise SystemExit(f"{name}: lorakit estimate failed (exit {code})")
    predicted = json.loads(stdout)
    if measured is not None:
        peak, measured_s = measured["measured_peak"], measured["measured_s"]
    else:
        print(f"{name}: estimate done, training {steps} steps", file=sys.stderr)
        code, _, peak = _run_child_with_rusage(cli + ["train", str(config_path), "--no-progress",
                                                      "train.skip_estimate=true"])
        if code != 0:
            raise SystemExit(f"{name}: lorakit train failed (exit {code})")
        measured_s = _measured_step_s(work / name)
    return {"row": name, "predicted_peak": predicted["peak"], "measured_peak": peak,
            "peak_error": (predicted["peak"] - peak) / peak, "predicted_s": predicted["seconds_per_step"],
            "measured_s": measured_s, "time_error": (predicted["seconds_per_step"] - measured_s) / measured_s,
            "parts": predicted["memory"], "load_peak": predicted["load_peak"]}


def _table(results: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'row':<14}{'peak est':>10}{'peak real':>11}{'error':>8}{'s/step est':>12}{'s/step real':>12}"
             f"{'error':>8}",
             "-" * 75]
    for r in results:
        lines.append(f"{r['row']:<14}{r['predicted_peak'] / gib:>9.2f}G{r['measured_peak'] / gib:>10.2f}G"
                     f"{100 * r['peak_error']:>7.1f}%{r['predicted_s']:>12.2f}{r['measured_s']:>12.2f}"
                     f"{100 * r['time_error']:>7.1f}%")
    within = sum(abs(r["peak_error"]) <= 0.15 and abs(r["time_error"]) <= 0.25 for r in results)
    lines.append(f"{within} of {len(results)} rows within both targets (peak 15%, step time 25%)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated row names (default: every row)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--big-model", help="directory of the ~3B model (benchmarks/make_big_model.py)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--measured", help="a --json file of an earlier run on this host: predict again, "
                                           "compare with its measurements (no training)")
    args = parser.parse_args()
    rows = _rows(args.big_model)
    chosen = args.only.split(",") if args.only else list(rows)
    unknown = [name for name in chosen if name not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(rows)}")
    earlier = {r["row"]: r for r in json.loads(Path(args.measured).read_text())} if args.measured else {}
    results = []
    with tempfile.TemporaryDirectory(prefix="lorakit-estimate-") as tmp:
        for name in chosen:
            if args.measured and name not in earlier:
                raise SystemExit(f"{args.measured} has no measurement for row {name}")
            results.append(run_row(name, rows[name], Path(tmp), args.steps, earlier.get(name)))
    import platform

    import torch

    print(f"host: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})" + (f"; measurements from {args.measured}" if earlier else ""))
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
