"""metrics.jsonl (one JSON object per logged step or evaluation) and the loss.png plot."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class MetricsLog:
    """Appends rows to ``<output_dir>/metrics.jsonl``; ``truncate_after(step)`` drops rows a
    resumed run is about to write again (those logged after the checkpoint it resumes from)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_NAME

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: str | Path) -> Path:
    """Train loss per logged step and eval loss per evaluation, on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
