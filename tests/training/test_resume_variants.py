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
