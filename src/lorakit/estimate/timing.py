"""Seconds per optimizer step, predicted from FLOPs and bytes with rates measured on this host.

A LoRA step is dominated by the frozen base's matmuls. For a micro-batch of M tokens, a linear
layer (in -> out) costs 2·M·in·out FLOPs forward, as much again for the input gradient in every
layer at or above the lowest trained one, and as much again for the weight gradient when the
weight itself trains (full fine-tuning); attention costs 4·B·T²·d_model forward (QK^T and AV)
and twice that backward; the head 2·N·H·V forward and as much backward over N labelled rows.

The rate of those matmuls is not the probe's square-matrix peak: it depends on the shapes and
the kind of base (a 4-bit base dequantizes its weight in every forward and backward). So the
calibration times the real thing, briefly: one frozen linear of the model's largest shape, of
the run's kind (dense fp32 / bf16 or bitsandbytes 4-bit / int8), forward + input gradient on
a (min(M, 1024), in) input, and SDPA forward + backward at the run's (heads, T, head_dim).
Everything else (norms, activations, adapters, copies) is memory-bound: the bytes autograd
keeps, written in forward and read twice in backward, over the probe's memory bandwidth.

A run with train.compact_memory (auto: QLoRA) allocates compactly (every allocation of 1 MiB or
more a fresh mapping, returned to the system when freed: ``lorakit._memory``), so each step's
large tensors are new pages the kernel maps and zeroes: the calibration also times first writes
to a fresh anonymous mapping against writes to a warm buffer (``fresh_bytes_per_s``).
Results are cached per host and shape next to the host probe (``lorakit env``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lorakit._cache import cache_dir
from lorakit._memory import compact_allocation_available
from lorakit._io import write_json_atomic

_FORMAT = 2
_MAX_TOKENS = 1024


@dataclass(frozen=True)
class Rates:
    """Measured on this host: seconds per base-matmul FLOP (forward + input gradient of the
    calibration linear over its FLOPs), seconds per attention FLOP, memory bytes per second,
    bytes per second of first writes to freshly mapped memory (page faults and zeroing)."""

    linear_s_per_flop: float
    attention_s_per_flop: float
    memory_bytes_per_s: float
    fresh_bytes_per_s: float


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _calibration_layer(in_features: int, out_features: int, kind: str, dtype: torch.dtype) -> nn.Module:
    layer = nn.Linear(in_features, out_features, bias=False, dtype=torch.float32)
    layer.requires_grad_(False)
    if kind in ("nf4", "fp4", "int8"):
        from lorakit.adapters.qlora.base import quantize_linear

        return quantize_linear(layer, kind, dtype, double_quant=True)
    return layer.to(dtype)


def _linear_rate(in_features: int, out_features: int, tokens: int, kind: str, dtype: torch.dtype) -> float:
    layer = _calibration_layer(in_features, out_features, kind, dtype)
    x = torch.randn(tokens, in_features, dtype=dtype, requires_grad=True)

    def step():
        layer(x).sum().backward()
        x.grad = None

    return _best_time(step) / (4 * tokens * in_features * out_features)


def _attention_rate(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype) -> float:
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        q.grad = k.grad = v.grad = None

    return _best_time(step) / (3 * 4 * batch * seq * seq * heads * head_dim)


def _fresh_memory_rate(megabytes: int = 64) -> float:
    """Bytes/s that mapping, first writing and unmapping anonymous memory adds over writing a
    warm buffer: what a compact allocator pays for every large tensor of a step."""
    import mmap

    if not compact_allocation_available():  # no compact allocator to pay for
        return float("inf")
    size = megabytes * 2**20
    warm = torch.empty(size, dtype=torch.uint8)
    warm.fill_(1)

    def fresh():
        with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as mapping:  # as malloc maps
            view = torch.frombuffer(mapping, dtype=torch.uint8)
            view.fill_(1)
            del view  # the buffer export must end before the mapping closes

    fresh_s = _best_time(fresh, repeats=5)
    # a difference of two timings: a busy moment during the warm fill would shrink it towards 0
    # (fresh pages free); the mapping costs most of a fresh write (87% here), so at least half
    extra = max(fresh_s - _best_time(lambda: warm.fill_(1), repeats=5), fresh_s / 2)
    return size / extra


def measure_rates(in_features: int, out_features: int, tokens: int, kind: str, dtype: torch.dtype,
                  heads: int, seq: int, head_dim: int, memory_bytes_per_s: float) -> Rates:
    """Run the calibration now (about a second; module docstring), without the cache."""
    tokens = max(1, min(tokens, _MAX_TOKENS))
    attention_batch = max(1, min(tokens // max(seq, 1), 4))
    with torch.enable_grad():
        return Rates(linear_s_per_flop=_linear_rate(in_features, out_features, tokens, kind, dtype),
                     attention_s_per_flop=_attention_rate(attention_batch, heads, min(seq, 2048), head_dim, dtype),
                     memory_bytes_per_s=memory_bytes_per_s, fresh_bytes_per_s=_fresh_memory_rate())


def host_rates(in_features: int, out_features: int, tokens: int, kind: str, dtype: torch.dtype, heads: int,
               seq: int, head_dim: int) -> Rates:
    """``measure_rates`` for these shapes on this host, measured again and combined with the cached
    rates: the faster of the two for each (a busy moment can only slow a measurement down, so the
    fastest seen is this host's; a calibration made while the host was loaded does not stay)."""
    from lorakit.hardware import _probe_path, probe_host

    probe = probe_host()
    tokens, seq = min(tokens, _MAX_TOKENS), min(seq, 2048)
    key = json.dumps([_FORMAT, _probe_path().name, in_features, out_features, tokens, kind, str(dtype), heads, seq,
                      head_dim])
    path = cache_dir() / "host" / f"step-rates-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    rates = measure_rates(in_features, out_features, tokens, kind, dtype, heads, seq, head_dim,
                          probe.memory_gbps * 1e9)
    try:
        cached = Rates(**json.loads(path.read_text()))
        rates = Rates(linear_s_per_flop=min(rates.linear_s_per_flop, cached.linear_s_per_flop),
                      attention_s_per_flop=min(rates.attention_s_per_flop, cached.attention_s_per_flop),
                      memory_bytes_per_s=max(rates.memory_bytes_per_s, cached.memory_bytes_per_s),
                      fresh_bytes_per_s=rates.fresh_bytes_per_s)  # a difference of timings: this reading
    except (OSError, ValueError, TypeError):
        pass
    try:
        write_json_atomic(path, asdict(rates))
    except OSError:
        pass  # a read-only cache only costs the next estimate another second
    return rates


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step does: FLOPs of base matmuls (forward + backward), attention
    FLOPs (forward + backward), bytes of memory-bound traffic (activations, optimizer), and
    bytes written to freshly mapped memory (a compact allocator's large tensors; else 0)."""

    linear_flops: float
    attention_flops: float
    memory_bytes: float
    fresh_bytes: float = 0.0

    def seconds(self, rates: Rates) -> float:
        return (self.linear_flops * rates.linear_s_per_flop + self.attention_flops * rates.attention_s_per_flop
                + self.memory_bytes / rates.memory_bytes_per_s + self.fresh_bytes / rates.fresh_bytes_per_s)
