"""Shared pieces of the fuzz suites: case counters, the one-line property, a hang guard.

Every property has the same shape: the call under test either returns or raises
``LorakitError`` whose message is one line; any other exception, a message of several lines,
or a call that runs past its time limit is a bug the suite reports.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

from lorakit.errors import LorakitError

AREAS = ("config", "data", "adapter", "gguf")
CASES: Counter = Counter()      # area -> generated cases run (every call of a property's body)
SECONDS: Counter = Counter()    # area -> seconds spent in those bodies

# Fuzz settings: no per-example deadline (the hang guard below bounds a case instead), and
# no health checks about slow or large generation (the inputs are files, built on purpose).
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                  HealthCheck.large_base_example, HealthCheck.filter_too_much])


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, **FUZZ)


class Hang(BaseException):
    """A case ran past its time limit (BaseException: ``except Exception`` in the code under
    test must not swallow it)."""


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise Hang when the block runs longer than ``seconds`` (SIGALRM; main thread only)."""
    def on_alarm(signum, frame):
        raise Hang(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def counted(area: str):
    """Count one generated case of ``area`` and the time it takes."""
    CASES[area] += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[area] += time.perf_counter() - start


def assert_one_line(err: BaseException) -> str:
    """The message of a LorakitError, checked to be one non-empty line."""
    assert isinstance(err, LorakitError), f"{type(err).__name__} instead of LorakitError: {err}"
    message = str(err)
    assert message.strip(), "empty LorakitError message"
    assert len(message.splitlines()) == 1, f"LorakitError message of several lines: {message!r}"
    return message


def outcome(call, *args, **kwargs):
    """(result, None) or (None, one-line message of the LorakitError ``call`` raised); any other
    exception propagates, so hypothesis reports it with the input that caused it."""
    try:
        return call(*args, **kwargs), None
    except LorakitError as err:
        return None, assert_one_line(err)
