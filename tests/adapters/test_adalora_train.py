"""AdaLoRA through the command line: `lorakit train` with method adalora on a tiny Llama,
then `lorakit info` on the result, and peft loading the pruned adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import FP32_ATOL
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit import load_adapter

main = pytest.importorskip("lorakit.cli").main
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def _tiny_llama_dir(directory: Path, tokenizer) -> Path:
    """A 2-layer random Llama (hidden 32) with the real tokenizer's vocabulary, saved with it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _rows(source: str, target: Path, rows: int) -> str:
    target.write_text("\n".join((EXAMPLES / source).read_text().splitlines()[:rows]) + "\n")
    return str(target)


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # peft warns on its own AdaLoRA files too
def test_lorakit_train_adalora_prunes_to_budget_and_info_shows_it(tmp_path, smol_tokenizer, capsys):
    model_dir = _tiny_llama_dir(tmp_path / "model", smol_tokenizer)
    config = {
        "model": str(model_dir),
        "method": "adalora",  # total_step is left out: the run's step count fills it in
        "lora": {"init_r": 6, "target_r": 3, "tinit": 2, "tfinal": 4, "lora_alpha": 16,
                 "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"train": _rows("support_train.jsonl", tmp_path / "train.jsonl", 24),
                 "eval": _rows("support_eval.jsonl", tmp_path / "eval.jsonl", 8), "max_seq_len": 128},
        "train": {"max_steps": 16, "batch_size": 4, "lr": 5e-2, "seed": 7, "logging_steps": 1},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    after, before = map(float, re.search(r"eval loss ([\d.]+) \(before: ([\d.]+)\)", summary).groups())
    assert after < before - 0.01  # held-out language-model loss drops
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert losses[max(losses)] < losses[min(losses)]

    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 16
    ranks = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert len(ranks) == 6 and sum(ranks) == 3 * 6 and len(set(ranks)) > 1

    assert main(["info", str(tmp_path / "out")]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^method:\s+adalora \(peft_type ADALORA\)$", info, re.M)
    assert re.search(r"^rank_pattern:\s+6 per-module ranks$", info, re.M)
    assert re.search(r"^rank\(s\):\s+" + re.escape(", ".join(str(r) for r in sorted(set(ranks)))), info, re.M)

    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=FP32_ATOL, rtol=0)
