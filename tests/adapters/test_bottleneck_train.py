"""Bottleneck adapters through the command line: `lorakit train` with method adapter on a tiny
Llama (the loss drops, a resumed run repeats the uninterrupted one), `lorakit info` on the
result, and `lorakit merge` refused in one line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import step_losses, tiny_config_dict, tiny_llama_dir  # noqa: E402,F401 (fixture)

from lorakit import load_adapter  # noqa: E402
from lorakit.adapters.bottleneck import BottleneckLayer  # noqa: E402
from lorakit.cli import main  # noqa: E402


def _write_config(model_dir: Path, tmp_path: Path, name: str, **train) -> Path:
    data = tiny_config_dict(model_dir, tmp_path, tmp_path / name, max_steps=6, batch_size=2, save_every=3, **train)
    data["method"] = "adapter"
    data["lora"] = {"placement": "houlsby", "reduction_factor": 4, "non_linearity": "gelu"}
    data["data"]["max_seq_len"] = 96
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_lorakit_train_adapter_resumes_exactly_and_info_describes_it(tiny_llama_dir, tmp_path, capsys):
    assert main(["train", str(_write_config(tiny_llama_dir, tmp_path, "full")), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    after, before = map(float, re.search(r"eval loss ([\d.]+) \(before: ([\d.]+)\)", summary).groups())
    assert after < before - 0.01
    out = tmp_path / "full"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "houlsby"

    checkpoint = out / "checkpoints" / "step-000003"
    resumed = _write_config(tiny_llama_dir, tmp_path, "resumed", resume=str(checkpoint))
    assert main(["train", str(resumed), "--no-progress"]) == 0
    full, again = step_losses(out), step_losses(tmp_path / "resumed")
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(full[step], abs=1e-6, rel=0)

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^method:\s+adapter \(peft_type BOTTLENECK\)$", info, re.M)
    assert re.search(r"^rank\(s\):\s+8$", info, re.M)  # the bottleneck size m = 32 // 4; no lora_alpha
    assert re.search(r"^targets:\s+down_proj, o_proj \(4 modules\)$", info, re.M)
    assert re.search(r"^placement:\s+houlsby$", info, re.M)

    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == 4  # 2 blocks x (attention, MLP)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".adapter_up." in n)  # trained

    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bottleneck adapters are non-linear and cannot be merged" in errors[0]
    assert not (tmp_path / "merged").exists()
