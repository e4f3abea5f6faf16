"""Unknown-key hints name the key people mean (issue 14: 'lora.rank' suggested 'rank_pattern')."""

from __future__ import annotations

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import closest_hint


@pytest.mark.parametrize("override, meant", [
    ("lora.rank=8", "r"), ("lora.alpha=16", "lora_alpha"), ("lora.dropout=0.1", "lora_dropout"),
    ("lora.target=[q_proj]", "target_modules"), ("train.learning_rate=1e-4", "lr"),
    ("train.gradient_accumulation_steps=2", "grad_accum"),
    ("train.lrr=1", "lr"), ("lora.lora_alpah=16", "lora_alpha"), ("lora.rank_patern={}", "rank_pattern"),
])
def test_unknown_key_suggests_the_key_people_mean(tmp_path, capsys, override, meant):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "unused"), "output_dir": str(tmp_path / "out")}))
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key") and err.count("\n") == 1
    assert f"(did you mean '{meant}'?)" in err, err


def test_alias_is_only_suggested_when_it_is_a_valid_choice():
    assert closest_hint("rank", ["rank_pattern", "r"]) == " (did you mean 'r'?)"
    assert closest_hint("rank", ["rank_pattern"]) == " (did you mean 'rank_pattern'?)"  # no 'r' here
    assert closest_hint("alpha", ["lr", "epochs"]) == ""
    assert closest_hint("cosine_restart", ["cosine", "linear"]) == " (did you mean 'cosine'?)"
