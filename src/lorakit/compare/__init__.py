"""``lorakit compare``: every method trained on the same data with the same budget, measured
side by side (entries.py: what runs; worker.py: one method in its own process; report.py)."""

from lorakit.compare.entries import DEFAULT_ENTRIES
from lorakit.compare.run import compare

__all__ = ["DEFAULT_ENTRIES", "compare"]
