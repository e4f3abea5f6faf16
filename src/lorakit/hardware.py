"""What this CPU can do, measured once per machine, and the training precision that follows.

Precision matters more than anything else on a CPU: a host with native bf16 (AVX-512-BF16 or
AMX) multiplies bf16 matrices about 3x faster than fp32, while a host without it emulates bf16
hundreds of times slower (measured on a 2-core AVX2 host: 116 GFLOP/s fp32, 0.3 GFLOP/s bf16
for a 2048^3 matmul). So ``train.precision: auto`` does not guess from the CPU's name: it times
a matmul in each dtype (``probe_host``) and picks bf16 only where it is native *and* faster.

The probe takes well under a second and is cached per machine (CPU model, ISA level, threads,
torch version) as JSON under lorakit's cache dir; ``lorakit env`` prints it. A leaf module:
it imports nothing of lorakit's except the other leaves (cache dir, atomic writes).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from lorakit._cache import cache_dir
from lorakit._io import write_json_atomic

_PROBE_FORMAT = 1
# bf16 counts as "faster" when its matmul beats fp32 by this factor: a smaller margin is eaten by
# the casts and fp32 adapter work that a bf16 base adds around every matmul.
BF16_MIN_SPEEDUP = 1.3
# Below this fraction of the fp32 rate, bf16 is emulated (no native instructions).
BF16_NATIVE_MIN_RATIO = 0.5


@dataclass(frozen=True)
class HostProbe:
    """Measured facts about this host. GFLOP/s are the best of a few square matmuls per dtype
    (2·n³ FLOPs each) with torch's current thread count; memory_gbps is a large tensor copy
    (read + write bytes per second)."""

    cpu: str
    capability: str              # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    bf16_instructions: bool      # AVX-512-BF16 or AMX reported by torch
    threads: int
    fp32_gflops: float
    bf16_gflops: float
    memory_gbps: float
    torch_version: str

    @property
    def bf16_native(self) -> bool:
        return self.bf16_gflops >= BF16_NATIVE_MIN_RATIO * self.fp32_gflops

    @property
    def bf16_faster(self) -> bool:
        return self.bf16_native and self.bf16_gflops >= BF16_MIN_SPEEDUP * self.fp32_gflops

    @property
    def bf16_slowdown(self) -> float:
        """How many times slower a bf16 matmul is than fp32 here (< 1 means faster)."""
        return self.fp32_gflops / max(self.bf16_gflops, 1e-9)

    def summary(self) -> str:
        """One line for logs and benchmark tables."""
        isa = "native bf16" if self.bf16_native else "no native bf16"
        return (f"{self.cpu} | {self.capability} ({isa}) | {self.threads} threads | matmul fp32 "
                f"{self.fp32_gflops:.0f} / bf16 {self.bf16_gflops:.1f} GFLOP/s | memory {self.memory_gbps:.1f} GB/s "
                f"| torch {self.torch_version}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _bf16_instructions() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best rate of an (n, n) @ (n, n) matmul in ``dtype``, after one warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def _bf16_gflops(fp32_gflops: float) -> float:
    """bf16 matmul rate; a small trial first, so an emulating host costs milliseconds, not minutes."""
    trial = matmul_gflops(torch.bfloat16, 256, repeats=2)  # ~0.1 s each where bf16 is emulated
    if trial < BF16_NATIVE_MIN_RATIO * fp32_gflops / 10:
        return trial  # emulated: hundreds of times slower, no need to measure it precisely
    return matmul_gflops(torch.bfloat16, 1024)


def _memory_gbps(mib: int = 256, repeats: int = 3) -> float:
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 4 / best / 1e9


def measure_host() -> HostProbe:
    """Run the probe now (about 0.5 s on a 2-core host), without the cache."""
    fp32 = matmul_gflops(torch.float32, 1024)
    return HostProbe(cpu=_cpu_name(), capability=torch.backends.cpu.get_cpu_capability(),
                     bf16_instructions=_bf16_instructions(), threads=torch.get_num_threads(), fp32_gflops=fp32,
                     bf16_gflops=_bf16_gflops(fp32), memory_gbps=_memory_gbps(), torch_version=torch.__version__)


def _probe_path():
    key = "|".join((_cpu_name(), torch.backends.cpu.get_cpu_capability(), str(torch.get_num_threads()),
                    torch.__version__, str(_PROBE_FORMAT)))
    return cache_dir() / "host" / f"probe-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


_PROBE: HostProbe | None = None


def probe_host(refresh: bool = False) -> HostProbe:
    """This machine's ``HostProbe``: from memory, else from the cache file, else measured (and cached)."""
    global _PROBE
    if _PROBE is not None and not refresh:
        return _PROBE
    path = _probe_path()
    if not refresh:
        try:
            _PROBE = HostProbe(**json.loads(path.read_text()))
            return _PROBE
        except (OSError, ValueError, TypeError):
            pass  # missing or from an older lorakit: measure again
    _PROBE = measure_host()
    try:
        write_json_atomic(path, asdict(_PROBE))
    except OSError:
        pass  # a read-only cache only costs the next process another half second
    return _PROBE


def resolve_precision(requested: str, probe: HostProbe | None = None) -> str:
    """"auto" -> "bf16" where this host's bf16 matmul is native and faster, else "fp32".
    An explicit "bf16" without native bf16 is kept (the user asked) with a one-line warning that
    gives the measured slowdown; "fp32" is always kept."""
    if requested == "fp32":
        return "fp32"
    probe = probe or probe_host()
    if requested == "auto":
        return "bf16" if probe.bf16_faster else "fp32"
    if requested == "bf16" and not probe.bf16_native:
        warnings.warn(f"lorakit: train.precision bf16 on a CPU without native bf16 ({probe.capability}): a bf16 "
                      f"matmul measured {probe.bf16_slowdown:.0f}x slower than fp32 here; use precision auto or fp32",
                      stacklevel=2)
    return requested


def preferred_compute_dtype(probe: HostProbe | None = None) -> torch.dtype:
    """The dtype a quantized base should compute in on this host (QLoRA's compute_dtype: auto)."""
    return torch.bfloat16 if resolve_precision("auto", probe) == "bf16" else torch.float32
