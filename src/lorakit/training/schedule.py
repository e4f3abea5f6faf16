"""Learning-rate schedules: linear warmup, then linear or cosine decay to 0 (or constant).

The multiplier for the update that ends step ``s`` (0-based) with W = warmup steps, N = total:

    s < W:      s / W                                   (warmup, as in transformers)
    linear:     (N - s) / (N - W)
    cosine:     0.5 · (1 + cos(π · (s - W) / (N - W)))
    constant:   1

These are exactly transformers' get_{linear,cosine,constant}_schedule_with_warmup, so a
lorakit run and a transformers + peft run with the same settings see the same lr at every step.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, num_warmup: int, kind: str) -> float:
    if step < num_warmup:
        return step / max(1, num_warmup)
    if kind == "constant":
        return 1.0
    progress = (step - num_warmup) / max(1, total_steps - num_warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {kind!r}")


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, kind: str) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step (every param group keeps its own base lr,
    so LoRA+'s ratio between groups holds along the whole schedule)."""
    num_warmup = warmup_steps(total_steps, warmup_ratio)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, num_warmup, kind))
