"""DoRA, rsLoRA, gaussian, PiSSA and QLoRA through the command line: `lorakit train` on a tiny
Llama (loss drops), `lorakit info` on the result, and peft loading the saved adapter on the
original base with the same logits as lorakit."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import FP32_ATOL
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorakit import load_adapter

main = pytest.importorskip("lorakit.cli").main
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # lorakit_tiny helpers

# variant -> (method, extra lora keys, regex that `lorakit info` must print)
VARIANTS = {
    "dora": ("lora", {"use_dora": True}, r"^method:\s+lora \(DoRA\)"),
    "rslora": ("lora", {"use_rslora": True, "lora_alpha": 4}, r"^use_rslora:\s+True$"),
    "gaussian": ("lora", {"init_lora_weights": "gaussian"}, r"^init_lora_weights:\s+gaussian$"),
    # saved converted to plain LoRA for the original base: rank 2r = 8
    "pissa": ("lora", {"init_lora_weights": "pissa"}, r"^rank\(s\):\s+8 "),
    "qlora": ("qlora", {"target_modules": "all-linear"}, r"^method:\s+lora \(peft_type LORA\)$"),
}


def _train(tmp_path, smol_tokenizer, capsys, method, extra):
    from lorakit_tiny import save_tiny_llama, tiny_config_dict

    model_dir = save_tiny_llama(tmp_path / "model", smol_tokenizer)
    config = tiny_config_dict(model_dir, tmp_path, tmp_path / "out", max_steps=12, lr=5e-2)
    config["method"] = method
    config["lora"].update(extra)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    log = capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    return model_dir, losses, log.out + log.err


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lorakit_train_variant_loss_drops_info_shows_it_peft_loads_it(variant, tmp_path, smol_tokenizer, capsys):
    method, extra, info_pattern = VARIANTS[variant]
    model_dir, losses, log = _train(tmp_path, smol_tokenizer, capsys, method, extra)
    after, before = map(float, re.search(r"eval loss ([\d.]+) \(before: ([\d.]+)\)", log).groups())
    assert after < before - 0.01  # held-out language-model loss drops
    assert losses[max(losses)] < losses[min(losses)], losses

    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert saved["use_dora"] is (variant == "dora")
    assert main(["info", str(tmp_path / "out")]) == 0
    assert re.search(info_pattern, capsys.readouterr().out, re.M)

    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=FP32_ATOL, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-4)  # training changed the model


def test_training_injection_for_method_qlora_quantizes_the_base(tmp_path, smol_tokenizer):
    from lorakit_tiny import save_tiny_llama, tiny_config_dict

    from lorakit.adapters.qlora import QLoraConfig, is_quantized
    from lorakit.config import TrainingConfig
    from lorakit.training.loop import inject_adapters, load_base

    config = tiny_config_dict(save_tiny_llama(tmp_path / "model", smol_tokenizer), tmp_path, tmp_path / "out")
    config.update(method="qlora", lora={"r": 4, "target_modules": "all-linear", "quantization": "nf4"})
    training = TrainingConfig.from_dict(config)
    assert isinstance(training.lora, QLoraConfig)
    model = inject_adapters(load_base(training)[0], training, total_steps=4)
    layers = [layer for _, layer in model.adapter_layers()]
    assert len(layers) == 2 * 7 and all(is_quantized(layer.base_layer) for layer in layers)
    # the whole base is 4-bit (QLoRA), the output head and embedding too, but the head gets no adapter
    assert is_quantized(model.model.lm_head) and is_quantized(model.model.model.embed_tokens)
    assert "lm_head" not in dict(model.adapter_layers())

