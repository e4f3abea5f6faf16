"""Fault points for the crash tests (tests/training/test_kill.py): ``LORAKIT_KILL_AT=name:n``
makes this process SIGKILL itself the n-th time it reaches ``fault_point(name)``, so a test can
stop a run at an exact, otherwise unreachable moment (half an optimizer update, a checkpoint
written but not yet renamed, half a metrics line). Unset, a fault point is one dict lookup.

Points: step (after a step's first micro-batch backward), optimizer (after optimizer.step(),
before the schedule moves), atomic-write (a file fully written, before it replaces its target),
atomic-dir (a checkpoint directory complete, before its rename), metrics (half a metrics.jsonl
line written), final (the final adapter saved, before the model card). A leaf module.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("LORAKIT_KILL_AT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_TARGET = int(_COUNT) if _COUNT.isdigit() else 1
_hits = 0


def fault_point(name: str) -> None:
    """SIGKILL this process if ``LORAKIT_KILL_AT`` names this point and this is its n-th hit."""
    global _hits
    if name != _NAME:
        return
    _hits += 1
    if _hits == _TARGET:
        os.kill(os.getpid(), signal.SIGKILL)
