"""Crash at any point: ``lorakit train`` in a subprocess is SIGKILLed at exact moments (fault
points: lorakit/_faults.py) and at random times; after each kill, ``train.resume=true`` finishes
the run, and the per-step losses, the final adapter and every checkpoint equal an uninterrupted
run's (fp32, atol 1e-6). No kill may leave a checkpoint that loads but is wrong.

The fast tier kills a LoRA run at each kind of point; the long tier (``make test-long``) does
every point for LoRA, DoRA, PiSSA, QLoRA and AdaLoRA plus random-time kills, and prints the count.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from counters import COUNTS
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from safetensors.torch import load_file

STEPS, SAVE_EVERY = 6, 2
METHODS = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "pissa": ("lora", {"init_lora_weights": "pissa"}),
    "qlora": ("qlora", {"compute_dtype": "float32"}),
    "adalora": ("adalora", {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "lora_alpha": 8}),
}
# (fault point, which hit): a step's middle, half an optimizer update, a checkpoint file written but
# not renamed, a checkpoint directory complete but not renamed, half a metrics line, the final save
POINTS = [("step", 3), ("optimizer", 2), ("atomic-write", 3), ("atomic-dir", 2), ("metrics", 5), ("final", 1)]


def _config(model_dir: Path, tmp: Path, name: str, method: str) -> Path:
    registry_name, extra = METHODS[method]
    data = tiny_config_dict(model_dir, tmp, tmp / name, max_steps=STEPS, batch_size=2, save_every=SAVE_EVERY)
    data["method"] = registry_name
    if registry_name == "adalora":
        data["lora"] = {"target_modules": ["q_proj", "v_proj"], **extra}
    else:
        data["lora"].update(extra, lora_dropout=0.1)  # dropout on: the RNG state must survive the kill
    data["data"]["max_seq_len"] = 96
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(config: Path, *overrides: str, env: dict | None = None, kill_after_s: float | None = None):
    command = [sys.executable, "-m", "lorakit.cli", "train", str(config), "--no-progress", *overrides]
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after_s is not None:
        try:
            proc.wait(timeout=kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr


def _losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ours, theirs = load_file(a), load_file(b)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def _checkpoints_are_right(output_dir: Path, reference_dir: Path) -> None:
    """Every checkpoint the killed run left (a name latest_checkpoint would pick) is complete and
    holds exactly the reference run's state at that step."""
    for checkpoint in sorted((output_dir / "checkpoints").glob("step-*")):
        assert (checkpoint / "trainer_state.json").is_file(), f"{checkpoint.name} is incomplete"
        _assert_same_tensors(checkpoint / "adapter_model.safetensors",
                             reference_dir / "checkpoints" / checkpoint.name / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def references(tiny_llama_dir, tmp_path_factory):
    """Uninterrupted runs, one per method, made once."""
    tmp, made = tmp_path_factory.mktemp("kill-ref"), {}

    def reference(method: str) -> Path:
        if method not in made:
            config = _config(tiny_llama_dir, tmp, f"ref-{method}", method)
            code, stderr = _train(config)
            assert code == 0, stderr
            made[method] = tmp / f"ref-{method}"
        return made[method]

    return reference


def _kill_then_resume(tiny_llama_dir, tmp_path, references, method: str, env=None, kill_after_s=None) -> None:
    reference = references(method)
    config = _config(tiny_llama_dir, tmp_path, "killed", method)
    code, stderr = _train(config, env=env, kill_after_s=kill_after_s)
    killed = code == -signal.SIGKILL
    COUNTS["kill points tried"] += killed
    if env is not None:
        assert killed, f"the fault point {env} was not reached: {stderr[-500:]}"
    out = tmp_path / "killed"
    if (out / "checkpoints").is_dir():
        _checkpoints_are_right(out, reference)
    code, stderr = _train(config, "train.resume=true")
    assert code == 0, stderr
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))
    expected, got = _losses(reference), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=1e-6, rel=0), f"step {step}"
    _assert_same_tensors(out / "adapter_model.safetensors", reference / "adapter_model.safetensors")
    _checkpoints_are_right(out, reference)


@pytest.mark.parametrize("point,hit", POINTS)
def test_lora_run_killed_at_each_kind_of_point_resumes_exactly(point, hit, tiny_llama_dir, tmp_path, references):
    _kill_then_resume(tiny_llama_dir, tmp_path, references, "lora", env={"LORAKIT_KILL_AT": f"{point}:{hit}"})


@pytest.mark.long
@pytest.mark.parametrize("point,hit", POINTS + [("step", 6), ("atomic-write", 1), ("atomic-dir", 3)])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_every_method_killed_at_every_point_resumes_exactly(method, point, hit, tiny_llama_dir, tmp_path,
                                                             references):
    _kill_then_resume(tiny_llama_dir, tmp_path, references, method, env={"LORAKIT_KILL_AT": f"{point}:{hit}"})


@pytest.mark.long
@pytest.mark.parametrize("seed", range(10))
def test_killed_at_a_random_time_resumes_exactly(seed, tiny_llama_dir, tmp_path, references):
    rng = random.Random(seed)
    method = rng.choice(list(METHODS))
    _kill_then_resume(tiny_llama_dir, tmp_path, references, method, kill_after_s=rng.uniform(2.0, 12.0))
