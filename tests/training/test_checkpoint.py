"""Checkpoints: contents (peft-layout adapter, optimizer, scheduler, RNG, trainer state), exact
restore, atomic writes (a failed save leaves the previous checkpoint as the latest)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import sample_input_ids, tiny_model

from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.training import checkpoint as ckpt
from lorakit.training.optim import make_optimizer
from lorakit.training.schedule import make_scheduler


def _setup(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    optimizer = make_optimizer(model, 1e-2, 0.0, loraplus_lr_ratio=2)
    scheduler = make_scheduler(optimizer, 10, 0.2, "linear")
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    model.train()
    loss = model(input_ids=sample_input_ids(), labels=sample_input_ids()).loss
    loss.backward()
    optimizer.step(), scheduler.step(), optimizer.zero_grad()
    return float(loss)


def test_checkpoint_contents_and_exact_restore(tmp_path):
    model, optimizer, scheduler = _setup()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    random.random()
    directory = ckpt.checkpoint_dir(tmp_path, 3)
    ckpt.save_checkpoint(directory, model, optimizer, scheduler, [ckpt.capture_rng()], {"global_step": 3})
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pt", "scheduler.pt",
        "trainer_state.json"]
    assert ckpt.latest_checkpoint(tmp_path) == directory
    saved_adapter = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    expected = [_step(model, optimizer, scheduler) for _ in range(2)]  # includes dropout draws
    # the adapter part is an ordinary peft-layout adapter
    loaded = load_adapter(tiny_model("llama"), directory)
    for key, value in saved_adapter.items():
        torch.testing.assert_close(loaded.adapter_state_dict()[key], value, atol=0, rtol=0)

    fresh, fresh_opt, fresh_sched = _setup(seed=123)  # different init and RNG
    state = ckpt.load_checkpoint(directory, fresh, fresh_opt, fresh_sched)
    assert state == {"global_step": 3}
    assert fresh_sched.last_epoch == 3 and fresh_opt.param_groups[1]["lr"] == pytest.approx(2 * fresh_opt.param_groups[0]["lr"])
    assert [_step(fresh, fresh_opt, fresh_sched) for _ in range(2)] == pytest.approx(expected, abs=1e-7)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, 2), model, optimizer, scheduler, [ckpt.capture_rng()],
                         {"global_step": 2})
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, 4), model, optimizer, scheduler, [ckpt.capture_rng()],
                             {"global_step": 4})
    root = tmp_path / ckpt.CHECKPOINTS
    assert [p.name for p in root.iterdir()] == ["step-000002"]  # no partial step-000004, no temp dir
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    # a directory without trainer_state.json (e.g. copied by hand, incomplete) is never "latest"
    (root / "step-000009").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    assert json.loads((root / "step-000002" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_half_written_metrics_line_is_not_a_row_and_resume_drops_it(tmp_path):
    """A run killed inside MetricsLog.append leaves half a line; reading skips it (it used to
    raise JSONDecodeError on resume) and truncate_after rewrites only complete rows."""
    from lorakit.training.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    log.append({"step": 1, "loss": 2.0})
    with open(log.path, "a") as handle:
        handle.write('{"step": 2, "lo')
    assert log.rows() == [{"step": 1, "loss": 2.0}]
    log.truncate_after(1)
    log.append({"step": 2, "loss": 1.5})
    assert log.rows() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_partial_writes_of_a_killed_run_are_removed(tmp_path):
    from lorakit.training.checkpoint import remove_partial_writes

    (tmp_path / "checkpoints" / ".step-000004.abc.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002").mkdir()
    (tmp_path / ".adapter_model.safetensors.xyz.tmp").write_bytes(b"half")
    removed = remove_partial_writes(tmp_path)
    assert len(removed) == 2 and (tmp_path / "checkpoints" / "step-000002").is_dir()
    assert not list(tmp_path.rglob("*.tmp"))
