"""Resume from a periodic checkpoint gives the same later losses for the LoRA variants whose
saved form differs from their training form (PiSSA: raw factors over a residual base; DoRA:
the magnitude vector)."""

from __future__ import annotations

import pytest
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)

from lorakit.config import TrainingConfig
from lorakit.training import train

VARIANTS = {"pissa": {"init_lora_weights": "pissa"}, "dora": {"use_dora": True}}


def _config(model_dir, tmp_path, name, lora_extra, **train_args):
    data = tiny_config_dict(model_dir, tmp_path, tmp_path / name, max_steps=4, batch_size=2, save_every=2,
                            **train_args)
    data["lora"].update(lora_extra)
    data["data"]["max_seq_len"] = 96
    return TrainingConfig.from_dict(data)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_variant_run_matches_uninterrupted(variant, tiny_llama_dir, tmp_path):
    reference = train(_config(tiny_llama_dir, tmp_path, "full", VARIANTS[variant]), progress=False)
    checkpoint = reference.output_dir / "checkpoints" / "step-000002"
    resumed = train(_config(tiny_llama_dir, tmp_path, "resumed", VARIANTS[variant], resume=str(checkpoint)),
                    progress=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)


def test_adalora_resume_is_exact_with_the_allocator_state(tiny_llama_dir, tmp_path):
    """AdaLoRA's rank allocator keeps smoothed importance scores and masks across steps; a resumed
    run restores them from the checkpoint (method_state.pt), so the pruning decisions, the losses
    and the final (pruned) adapter equal an uninterrupted run's."""
    import json

    import torch
    from safetensors.torch import load_file

    def config(name, **train_args):
        data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, max_steps=8, batch_size=2, save_every=2,
                                **train_args)
        data["method"] = "adalora"
        data["lora"] = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "lora_alpha": 8,
                        "target_modules": ["q_proj", "v_proj"]}
        data["data"]["max_seq_len"] = 96
        return TrainingConfig.from_dict(data)

    reference = train(config("ref"), progress=False)
    checkpoint = reference.output_dir / "checkpoints" / "step-000002"
    assert (checkpoint / "method_state.pt").is_file()
    resumed = train(config("resumed", resume=str(checkpoint)), progress=False)
    assert sorted(resumed.losses) == [3, 4, 5, 6, 7, 8]
    # the importance averages two steps later hold the history from before the interruption
    states = [torch.load(out / "checkpoints" / "step-000004" / "method_state.pt", weights_only=True)
              for out in (reference.output_dir, resumed.output_dir)]
    assert states[0]["sensitivity"].keys() == states[1]["sensitivity"].keys() and states[0]["sensitivity"]
    for table in ("sensitivity", "uncertainty"):
        for key, value in states[0][table].items():
            torch.testing.assert_close(states[1][table][key], value, atol=1e-7, rtol=1e-5)
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)
    saved = [json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
             for out in (reference.output_dir, resumed.output_dir)]
    assert saved[0] == saved[1] and any(not all(mask) for mask in saved[0].values())  # really pruned, identically
    ours, theirs = load_file(resumed.output_dir / "adapter_model.safetensors"), \
        load_file(reference.output_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
