"""The micro-batch shapes a run will see, from the samples' lengths alone (no tensors built).

The training plan of epoch 0 (``lorakit.data.batching.plan_batches``, the run's own function)
gives every micro-batch as rows of sample indices: a batch of R rows, the widest W tokens, is
an (R, W) tensor. Memory is sized at the largest such batch (R·W), time at the mean one.
Labelled positions N (what the loss head runs on) are the labels other than -100 after the
causal shift: a sample's first token is never a target, packed or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.batching import plan_batches
from lorakit.data.templates import IGNORE_INDEX


@dataclass(frozen=True)
class BatchShapes:
    """(rows, width, labelled) of the largest micro-batch; mean tokens (rows x width) and mean
    labelled positions per micro-batch; mean width (what attention's cost grows with)."""

    rows: int
    width: int
    labelled: int
    mean_tokens: float
    mean_labelled: float
    mean_width: float
    micro_batches: int

    def scaled(self, factor: float) -> "BatchShapes":
        """The shapes with ``factor`` x the rows per micro-batch (batch_size changed, width kept)."""
        rows = max(1, round(self.rows * factor))
        return BatchShapes(rows, self.width, round(self.labelled * rows / self.rows), self.mean_tokens * factor,
                           self.mean_labelled * factor, self.mean_width, self.micro_batches)


def _targets(sample: dict) -> int:
    return sum(1 for label in sample["labels"][1:] if label != IGNORE_INDEX)


def batch_shapes(samples: list[dict], batch_size: int, packing: bool, max_seq_len: int, seed: int,
                 group_by_length: bool) -> BatchShapes:
    """``BatchShapes`` of epoch 0 of a run with these settings."""
    lengths = [len(s["input_ids"]) for s in samples]
    targets = [_targets(s) for s in samples]
    plan = plan_batches(lengths, batch_size, packing, max_seq_len, shuffle=True, seed=seed,
                        group_by_length=group_by_length)
    shapes = []
    for batch in plan:
        widths = [sum(lengths[i] for i in row) for row in batch]
        shapes.append((len(batch), max(widths), sum(targets[i] for row in batch for i in row)))
    rows, width, labelled = max(shapes, key=lambda s: (s[0] * s[1], s[2]))
    count = len(shapes)
    return BatchShapes(rows=rows, width=width, labelled=labelled,
                       mean_tokens=sum(r * w for r, w, _ in shapes) / count,
                       mean_labelled=sum(n for _, _, n in shapes) / count,
                       mean_width=sum(w for _, w, _ in shapes) / count, micro_batches=count)
