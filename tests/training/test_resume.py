"""Resume: a run interrupted after step k (Ctrl-C) and resumed gives the same per-step losses
and the same final adapter as an uninterrupted run (CPU fp32, atol 1e-6), with LoRA dropout on
so the RNG state must be restored too."""

from __future__ import annotations

import json

import pytest
import torch
from lorakit_tiny import step_losses, tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from safetensors.torch import load_file

from lorakit.config import TrainingConfig
from lorakit.errors import LorakitError
from lorakit.training import loop, train
from lorakit.training.checkpoint import latest_checkpoint

STEPS = 6


def _config(tiny_llama_dir, tmp_path, name, **train_args):
    args = dict(max_steps=STEPS, batch_size=2, grad_accum=2, warmup_ratio=0.2, scheduler="cosine",
                loraplus_lr_ratio=4)
    data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, **{**args, **train_args})
    data["lora"]["lora_dropout"] = 0.1
    data["data"]["max_seq_len"] = 96
    return TrainingConfig.from_dict(data)


def test_interrupted_then_resumed_run_equals_uninterrupted_run(tiny_llama_dir, tmp_path, monkeypatch):
    reference = train(_config(tiny_llama_dir, tmp_path, "full"), progress=False)
    assert len(reference.losses) == STEPS

    # Interrupt during step 4, after its first micro-batch has drawn dropout masks.
    real_step, calls = loop._forward_backward, []

    def interrupting_step(model, micro_batches, *args):
        calls.append(1)
        if len(calls) == 4:
            model(**{k: v for k, v in micro_batches[0].items()})
            raise KeyboardInterrupt
        return real_step(model, micro_batches, *args)

    monkeypatch.setattr(loop, "_forward_backward", interrupting_step)
    config = _config(tiny_llama_dir, tmp_path, "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    saved = latest_checkpoint(config.output_dir)
    assert saved is not None and saved.name == "step-000003"
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 3
    monkeypatch.setattr(loop, "_forward_backward", real_step)

    resumed_config = _config(tiny_llama_dir, tmp_path, "interrupted", resume=True)
    resumed = train(resumed_config, progress=False)
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)
    # metrics.jsonl of the resumed run reads like one run: steps 1..6 once each, same losses
    logged = step_losses(resumed_config.output_dir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, value in step_losses(reference.output_dir).items():
        assert logged[step] == pytest.approx(value, abs=1e-6, rel=0)
    ours = load_file(resumed.output_dir / "adapter_model.safetensors")
    theirs = load_file(reference.output_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    assert resumed.eval_loss == pytest.approx(reference.eval_loss, abs=1e-6)


def test_resume_from_a_periodic_checkpoint_path_and_config_guard(tiny_llama_dir, tmp_path):
    first = train(_config(tiny_llama_dir, tmp_path, "a", save_every=2, max_steps=4), progress=False)
    checkpoint = first.output_dir / "checkpoints" / "step-000002"
    assert latest_checkpoint(first.output_dir).name == "step-000004"
    with pytest.raises(LorakitError, match="cannot resume .* 'train.seed' was 7 there and is 8 now"):
        train(_config(tiny_llama_dir, tmp_path, "b", resume=str(checkpoint), seed=8, max_steps=4), progress=False)
    resumed = train(_config(tiny_llama_dir, tmp_path, "b", resume=str(checkpoint), max_steps=4), progress=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(first.losses[step], abs=1e-6, rel=0)
