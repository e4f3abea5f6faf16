"""metrics.jsonl (one JSON object per logged step or evaluation) and the loss.png plot."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit._faults import fault_point
from lorakit._io import write_text_atomic

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class MetricsLog:
    """Appends rows to ``<output_dir>/metrics.jsonl``; ``truncate_after(step)`` drops rows a
    resumed run is about to write again (those logged after the checkpoint it resumes from)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_NAME

    def rows(self) -> list[dict]:
        """The complete rows: a last line without its newline (a write the process was killed in)
        is not a row."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace")
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step`` (replaced atomically: a kill now loses nothing)."""
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line[: len(line) // 2])
            handle.flush()
            fault_point("metrics")  # a kill here leaves half a line, which rows() ignores
            handle.write(line[len(line) // 2:])


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
