"""``lorakit estimate``: will a training run fit in memory, and how long will a step take,
decided before any weight is loaded (see ``run`` for the memory model, ``timing`` for time)."""

from lorakit.estimate.report import format_report, verdict
from lorakit.estimate.run import Estimate, estimate

__all__ = ["Estimate", "estimate", "format_report", "verdict"]
