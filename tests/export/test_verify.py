"""lorakit verify (issue 12): passes when the merged model and its files agree with the adapter,
fails (exit 1, naming the stage) when a stage is broken on purpose."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from lorakit_tiny import save_tiny_llama  # noqa: E402

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def adapter_and_merged(tmp_path_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("verify")
    base = save_tiny_llama(root / "base", smol_tokenizer)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(root / "adapter")
    assert main(["merge", "--adapter", str(root / "adapter"), "--output", str(root / "merged")]) == 0
    return root / "adapter", root / "merged"


def _verify(capsys, *args: str) -> tuple[int, str]:
    code = main(["verify", "--prompts", "2", "--max-new-tokens", "8", *args])
    return code, capsys.readouterr().out


def test_verify_passes_when_every_stage_agrees(adapter_and_merged, capsys):
    adapter, merged = adapter_and_merged
    code, out = _verify(capsys, "--adapter", str(adapter), "--merged", str(merged))
    assert code == 0, out
    assert "2 prompts from built-in questions" in out
    row = next(line for line in out.splitlines() if line.startswith("merged"))
    assert "2/2" in row and "same" in row and row.endswith("ok")
    assert "verify: all 2 stages agree on 2 prompts" in out


def test_verify_fails_at_the_merged_stage_when_its_chat_template_is_lost(adapter_and_merged, tmp_path, capsys):
    """A merged model saved without its tokenizer's chat template: generation would no longer
    stop where it should; verify names the stage and the missing template."""
    import shutil

    adapter, merged = adapter_and_merged
    broken = tmp_path / "merged-without-template"
    shutil.copytree(merged, broken)
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    config_file = broken / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    code, out = _verify(capsys, "--adapter", str(adapter), "--merged", str(broken))
    assert code == 1
    assert "verify: FAILED at merged" in out and "chat template missing" in out


def test_verify_fails_when_the_merged_weights_are_another_models(adapter_and_merged, tmp_path, smol_tokenizer, capsys):
    adapter, _ = adapter_and_merged
    other = save_tiny_llama(tmp_path / "other", smol_tokenizer, seed=5)
    code, out = _verify(capsys, "--adapter", str(adapter), "--merged", str(other))
    assert code == 1 and "FAILED at merged" in out and "mean KL" in out
