"""train.compact_memory: the allocator policy a run really gets. Under compact allocation every
allocation of 1 MiB or more is a mapping of its own (glibc's M_MMAP_THRESHOLD fixed, its rising
threshold off); under glibc's default, once a 16 MiB block has been freed, 6 MiB tensors come
from the heap. Each case runs in a fresh process: the policy lasts for the rest of a process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)

from lorakit.config import TrainingConfig
from lorakit.training.loop import compact_memory

PROBE = """
import ctypes, json, sys
import torch
from lorakit.config import TrainingConfig
from lorakit.training import loop

loop.load_base(TrainingConfig.from_dict(json.loads(sys.argv[1])), precision="fp32")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
del_after = torch.ones(4 * 2**20)  # 16 MiB, freed: glibc's default threshold rises past 6 MiB
del del_after
before = libc.mallinfo2().hblkhd
kept = [torch.ones(1536 * 1024) for _ in range(40)]  # 40 x 6 MiB: more than free heap space could hold
print((libc.mallinfo2().hblkhd - before) // (1536 * 1024 * 4))
"""


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
                    reason="the allocator policy is glibc's; the probe reads glibc >= 2.33's mallinfo2")
@pytest.mark.parametrize("method, setting, compact", [
    ("qlora", "auto", True), ("qlora", False, False), ("lora", "auto", False), ("lora", True, True)])
def test_compact_memory_maps_every_large_allocation_on_its_own(tiny_llama_dir, tmp_path, method, setting, compact):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / "out", compact_memory=setting)
    data["method"] = method
    assert compact_memory(TrainingConfig.from_dict(data)) is compact
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(data)], capture_output=True, text=True, check=True,
                         timeout=300)
    mapped = int(out.stdout.split()[-1])  # of the 40 blocks, how many are mappings of their own
    assert mapped >= 30 if compact else mapped == 0, mapped
