"""The built-in SmolLM2-135M-Instruct with the quickstart config: a few steps lower the eval loss."""

from __future__ import annotations

import pytest
from lorakit_tiny import REPO, SUPPORT_EVAL, write_chat_subset

from lorakit.config import load_config
from lorakit.training import train


@pytest.mark.slow
def test_quickstart_config_lowers_eval_loss_on_builtin_model(tmp_path, builtin_model_dir):
    eval_file = write_chat_subset(tmp_path / "eval.jsonl", SUPPORT_EVAL, rows=8)
    config = load_config(REPO / "examples" / "quickstart.yaml", [
        "train.max_steps=4", "train.batch_size=2", "train.warmup_ratio=0", f"data.eval={eval_file}",
        f"output_dir={tmp_path / 'out'}"])
    config.data.train = str(REPO / "examples" / "data" / "support_train.jsonl")
    assert config.model == "smollm2-135m-instruct"
    result = train(config, progress=False)
    assert result.initial_eval_loss is not None and result.eval_loss < result.initial_eval_loss - 0.1
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
