"""transformers' Trainer with a lorakit model under DDP (two CPU processes, gloo): rank 0 writes
the checkpoints and the adapter in peft's layout, every rank resumes from them, and the resumed
run ends with the uninterrupted run's adapter. Two torchrun launches: the long tier."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_flow import max_difference

FLOW = Path(__file__).resolve().parent / "trainer_flow.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(FLOW), "ddp", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          cwd=FLOW.parent.parent)  # tests/ for trainer_flow's own imports
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.long
def test_ddp_checkpoints_and_resume(tmp_path):
    _torchrun(str(tmp_path / "run"))
    names = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert "model.safetensors" not in names
    _torchrun(str(tmp_path / "resumed"), str(tmp_path / "run" / "checkpoint-2"))
    finished = torch.load(tmp_path / "run" / "final_adapter.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final_adapter.pt", weights_only=True)
    assert max_difference(resumed, finished) == 0.0
