"""This process's memory and the host's free memory, read from the kernel (no psutil).

Linux: ``/proc/self/status`` (VmRSS: resident now, VmHWM: the peak so far) and ``/proc/meminfo``
(MemAvailable: what can be allocated without swapping). Elsewhere ``resource.getrusage``'s peak
and the physical memory size stand in. ``use_compact_allocation`` switches glibc's malloc to
memory-first for the rest of the process. A leaf module: it imports nothing of lorakit's.
"""

from __future__ import annotations

import functools
import os
import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had (VmHWM)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS; the peak where the kernel does not say)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def available_bytes() -> int:
    """Memory the host can still give (MemAvailable), else its physical size."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Allocations at least this large are mappings of their own under ``use_compact_allocation``.
COMPACT_MMAP_THRESHOLD = 1 << 20


@functools.cache
def compact_allocation_available() -> bool:
    """Whether ``use_compact_allocation`` can act here: glibc's malloc (Linux). Cached: the
    answer is fixed for the process, and ``platform.libc_ver`` reads the interpreter's binary."""
    import platform

    return platform.libc_ver()[0] == "glibc"


def use_compact_allocation() -> bool:
    """Memory first, for the rest of the process: glibc's M_MMAP_THRESHOLD fixed at 1 MiB, so an
    allocation that large is a mapping of its own, returned to the system when freed, and glibc's
    rising threshold is off. With glibc's default (a threshold that rises to 32 MiB after the first
    large free) a training step's activations are carved from the heap, where freed blocks between
    live ones stay resident. The heap's top may keep at most 2 MiB free (M_TRIM_THRESHOLD, twice
    the threshold, as glibc's own rule) and is trimmed now: a large request that free heap space
    could serve never reaches the mapping rule. The price: every large tensor is fresh pages the
    kernel maps and zeroes (README "lorakit estimate"). True when set; False without glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mapped = libc.mallopt(-3, COMPACT_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        trimmed = libc.mallopt(-1, 2 * COMPACT_MMAP_THRESHOLD)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
        return bool(mapped and trimmed)
    except (OSError, AttributeError):
        return False
