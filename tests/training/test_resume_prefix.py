"""Prefix tuning trains through ``lorakit.training.train`` (its forward is not the inner model's, so
evaluation runs the full forward) and resumes exactly from a periodic checkpoint, the projection
MLP included (the checkpoint holds the raw parameters, the adapter files only the MLP's output)."""

from __future__ import annotations

import pytest
from lorakit_tiny import tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM

from lorakit import load_adapter
from lorakit.adapters.prefix import PrefixModel
from lorakit.config import TrainingConfig
from lorakit.training import train


def _config(model_dir, tmp_path, name, projection, **train_args):
    data = tiny_config_dict(model_dir, tmp_path, tmp_path / name, max_steps=4, batch_size=2, save_every=2,
                            eval_every=2, **train_args)
    data["method"] = "prefix"
    data["lora"] = {"num_virtual_tokens": 4, "prefix_projection": projection}
    data["data"]["max_seq_len"] = 96
    return TrainingConfig.from_dict(data)


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "projection"])
def test_prefix_run_trains_and_resumes_exactly(projection, tiny_llama_dir, tmp_path):
    reference = train(_config(tiny_llama_dir, tmp_path, "full", projection), progress=False)
    assert reference.losses[4] < reference.losses[1]
    checkpoint = reference.output_dir / "checkpoints" / "step-000002"
    resumed = train(_config(tiny_llama_dir, tmp_path, "resumed", projection, resume=str(checkpoint)),
                    progress=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert isinstance(load_adapter(base, reference.output_dir), PrefixModel)  # the final adapter
