"""Fuzz suites: print how many cases each property generated (and how long they took)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "training"))


def pytest_configure(config):
    import datasets

    datasets.disable_progress_bars()  # thousands of tiny files: no progress bar or log line for each
    datasets.logging.set_verbosity_error()


def pytest_terminal_summary(terminalreporter):
    from fuzz_common import AREAS, CASES, SECONDS

    total = sum(CASES.values())
    if not total:
        return
    counts = ", ".join(f"{area} {CASES[area]}" for area in AREAS)
    times = ", ".join(f"{area} {SECONDS[area]:.1f}s" for area in AREAS)
    terminalreporter.write_line(f"fuzz cases: {counts}, total {total}")
    terminalreporter.write_line(f"fuzz time in cases: {times}, total {sum(SECONDS.values()):.1f}s")
