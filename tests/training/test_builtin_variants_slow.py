"""Every LoRA-family method trains the built-in SmolLM2-135M-Instruct through `lorakit train`:
a few steps on the quickstart support data lower the held-out eval loss, and `lorakit info`
names the method of the saved adapter."""

from __future__ import annotations

import json

import pytest
import yaml
from lorakit_tiny import SUPPORT_EVAL, SUPPORT_TRAIN, write_chat_subset

from lorakit.cli import main

TOP_LAYERS = [26, 27, 28, 29]  # adapters on the top blocks only: backward stops early, steps stay short
METHODS = {
    "lora": ("lora", {"r": 8, "lora_alpha": 16}, "lora"),
    "dora": ("lora", {"r": 8, "lora_alpha": 16, "use_dora": True}, "DoRA"),
    "rslora": ("lora", {"r": 8, "lora_alpha": 4, "use_rslora": True}, "lora"),
    "pissa": ("lora", {"r": 8, "lora_alpha": 8, "init_lora_weights": "pissa"}, "lora"),
    # AdaLoRA starts with Λ = 0 and P, Q ~ N(0, 0.02): its update grows slowly, so it gets a larger lr
    "adalora": ("adalora", {"init_r": 8, "target_r": 4, "lora_alpha": 16, "tinit": 1, "tfinal": 1, "deltaT": 1,
                            "lr": 5e-2}, "adalora"),
    "qlora": ("qlora", {"r": 8, "lora_alpha": 16}, "lora"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_method_lowers_eval_loss_on_builtin_model(name, tmp_path, builtin_model_dir, capsys):
    method, lora, info_word = METHODS[name]
    lora = dict(lora)
    lr = lora.pop("lr", 3e-3)
    lora = dict(lora, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], layers_to_transform=TOP_LAYERS)
    config = {
        "model": "smollm2-135m-instruct", "method": method, "lora": lora,
        "data": {"train": str(write_chat_subset(tmp_path / "train.jsonl", SUPPORT_TRAIN, rows=48)),
                 "eval": str(write_chat_subset(tmp_path / "eval.jsonl", SUPPORT_EVAL, rows=6)),
                 "max_seq_len": 192, "packing": True},
        "train": {"max_steps": 4, "batch_size": 2, "lr": lr, "warmup_ratio": 0, "seed": 0},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.05, f"{name}: eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "out")]) == 0
    assert info_word in capsys.readouterr().out
