"""Counts the long-proof tests report at the end of a pytest run (kill points tried, ...):
``COUNTS["kill points tried"] += 1``; tests/conftest.py prints every non-zero count."""

from collections import Counter

COUNTS: Counter = Counter()
