"""Several processes compute what one process computes: ``lorakit train`` under
``torchrun --nproc_per_node 2`` (gloo on CPU; the same code runs NCCL on GPUs) on a tiny Llama.

- DDP, dropout 0: 2 processes x grad_accum 1 take the same global batch as 1 process x
  grad_accum 2, so every step's loss and the final adapter agree (fp32, atol 1e-5).
- FSDP2 (``train.fsdp``), LoRA and DoRA: each process holds half of the frozen base, and the
  losses, evaluations and adapter files equal one process's; QLoRA and full fine-tuning are
  refused in one line.
- DDP resume, dropout on: a 2-process run SIGKILLed mid-way (both ranks, at a fault point) and
  resumed gives the losses and adapter of the uninterrupted 2-process run. Each rank draws its own
  dropout masks (seed + rank), so restoring rank 0's RNG state on every rank would change the losses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lorakit_tiny import step_losses, tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from safetensors.torch import load_file

from lorakit.config import TrainingConfig
from lorakit.errors import LorakitError
from lorakit.training import train

STEPS = 6


def _write_config(tiny_llama_dir, tmp: Path, name: str, dropout: float = 0.0, **train_args) -> Path:
    args = dict(max_steps=STEPS, batch_size=2, lr=5e-2, warmup_ratio=0.2, scheduler="cosine")
    data = tiny_config_dict(tiny_llama_dir, tmp, tmp / name, **{**args, **train_args})
    data["lora"]["lora_dropout"] = dropout
    data["data"]["max_seq_len"] = 96
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(config: Path, *overrides: str, nproc: int = 2, env: dict | None = None) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node N -m lorakit.cli train CONFIG``; (exit code, stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorakit.cli", "train", str(config), "--no-progress", *overrides]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    ours, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0, msg=key)


def assert_same_losses(got: dict[int, float], expected: dict[int, float], atol: float) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=atol, rel=0), f"step {step}"


def test_two_process_ddp_equals_one_process(tiny_llama_dir, tmp_path):
    one_config = _write_config(tiny_llama_dir, tmp_path, "one", grad_accum=2)
    one = train(TrainingConfig.from_dict(yaml.safe_load(one_config.read_text())), progress=False)
    code, output = torchrun(_write_config(tiny_llama_dir, tmp_path, "two", grad_accum=1))
    assert code == 0, output[-2000:]
    assert "6 steps of 2 x 1 x 2 samples" in output  # really two processes
    two = tmp_path / "two"
    assert_same_losses(step_losses(two), step_losses(one.output_dir), atol=1e-5)
    assert_same_adapter(two, one.output_dir, atol=1e-5)
    # training moved the adapter (lora_B starts at zero), so the comparison above compares something
    assert any(t.abs().max() > 1e-3 for k, t in load_file(two / "adapter_model.safetensors").items() if "lora_B" in k)


def test_two_process_run_killed_mid_way_resumes_with_every_ranks_rng(tiny_llama_dir, tmp_path):
    settings = dict(dropout=0.2, grad_accum=1, save_every=2)
    code, output = torchrun(_write_config(tiny_llama_dir, tmp_path, "reference", **settings))
    assert code == 0, output[-2000:]
    config = _write_config(tiny_llama_dir, tmp_path, "killed", **settings)
    # each rank SIGKILLs itself in step 4, after its first forward/backward drew dropout masks
    code, output = torchrun(config, env={"LORAKIT_KILL_AT": "step:4"})
    assert code != 0, "the fault point was not reached"
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-000002"]
    rng = torch.load(killed / "checkpoints" / "step-000002" / "rng_state.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one state per rank
    code, output = torchrun(config, "train.resume=true")
    assert code == 0, output[-2000:]
    assert "resumed from" in output and "step-000002" in output
    reference = tmp_path / "reference"
    assert_same_losses(step_losses(killed), step_losses(reference), atol=1e-6)
    assert_same_adapter(killed, reference, atol=1e-6)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_two_process_fsdp_equals_one_process(tiny_llama_dir, tmp_path, variant):
    """FSDP2: each process holds half of the frozen base; losses, eval and adapter equal one process."""
    extra = {"use_dora": True} if variant == "dora" else {}
    # lr 1e-2: AdamW divides by sqrt(v), so a smaller step keeps fp32 reduction-order noise below atol
    one_config = _write_config(tiny_llama_dir, tmp_path, "one", grad_accum=2, lr=1e-2)
    data = yaml.safe_load(one_config.read_text())
    data["lora"].update(extra)
    one = train(TrainingConfig.from_dict(data), progress=False)
    two_config = _write_config(tiny_llama_dir, tmp_path, "two", grad_accum=1, lr=1e-2, fsdp=True)
    data = yaml.safe_load(two_config.read_text())
    data["lora"].update(extra)
    two_config.write_text(yaml.safe_dump(data))
    code, output = torchrun(two_config)
    assert code == 0, output[-2000:]
    held, whole = (float(x) for x in re.search(r"fsdp: frozen base sharded over 2 processes, ([\d.]+) MiB of "
                                               r"([\d.]+) MiB on each", output).groups())
    assert held == pytest.approx(whole / 2, rel=0.01)  # really sharded
    two = tmp_path / "two"
    assert_same_losses(step_losses(two), step_losses(one.output_dir), atol=1e-5)
    assert_same_adapter(two, one.output_dir, atol=1e-5)
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("adapter_")) == \
        sorted(p.name for p in one.output_dir.iterdir() if p.name.startswith("adapter_"))
    evals = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in evals if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in reference if "eval_loss" in r], abs=1e-5)


def test_fsdp_refuses_qlora_and_full_in_one_line(tiny_llama_dir, tmp_path):
    for method, lora in (("qlora", {"r": 4, "target_modules": ["q_proj"]}), ("full", {})):
        data = yaml.safe_load(_write_config(tiny_llama_dir, tmp_path, method, fsdp=True).read_text())
        data["method"], data["lora"] = method, lora
        with pytest.raises(LorakitError, match=f"train.fsdp .*{'QLoRA' if method == 'qlora' else 'method full'}"):
            train(TrainingConfig.from_dict(data), progress=False)


def test_accelerates_own_fsdp_mode_is_refused_in_one_line(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data = yaml.safe_load(_write_config(tiny_llama_dir, tmp_path, "acc").read_text())
    with pytest.raises(LorakitError, match="set train.fsdp: true"):
        train(TrainingConfig.from_dict(data), progress=False)
