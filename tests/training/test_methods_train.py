"""The non-LoRA methods through the same training loop, data, loss, checkpoints and resume:
full fine-tuning (a transformers directory that AutoModelForCausalLM loads with the trained
logits) and the prompt baseline (nothing trained; few-shot context scored, not trained on)."""

from __future__ import annotations

import json

import pytest
import torch
from lorakit_tiny import step_losses, tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.config import TrainingConfig
from lorakit.data import build_datasets, make_batches
from lorakit.training import loop, train
from lorakit.training.evaluate import evaluate_loss


def _config(tiny_llama_dir, tmp_path, name, method, section, **train_args):
    data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, **{"max_steps": 4, **train_args})
    data["method"], data["lora"] = method, section
    return TrainingConfig.from_dict(data)


def _eval_batches(config, tokenizer):
    _, samples, _ = build_datasets(config.data, tokenizer)
    return make_batches(samples, 4, tokenizer.pad_token_id, False, config.data.max_seq_len, shuffle=False, seed=0)


def test_full_fine_tuning_saves_a_transformers_directory_with_the_trained_logits(tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, tmp_path, "full", "full", {})
    result = train(config, progress=False)
    assert result.eval_loss < result.initial_eval_loss
    out = result.output_dir
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer is saved with the model
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # the directory's model gives exactly the eval loss the run measured on its in-memory model
    assert evaluate_loss(trained, _eval_batches(config, tokenizer))["loss"] == pytest.approx(result.eval_loss, abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.named_parameters()))  # every weight trained


def test_full_fine_tuning_trainable_modules_trains_only_those(tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, tmp_path, "part", "full", {"trainable_modules": ["q_proj", "v_proj"]})
    out = train(config, progress=False).output_dir
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed and all(".q_proj." in n or ".v_proj." in n for n in changed)


def test_full_fine_tuning_resumes_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    reference = train(_config(tiny_llama_dir, tmp_path, "ref", "full", {}), progress=False)
    real_step, calls = loop._forward_backward, []

    def interrupting_step(model, micro_batches, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(model, micro_batches, *args)

    monkeypatch.setattr(loop, "_forward_backward", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_llama_dir, tmp_path, "cut", "full", {}), progress=False)
    monkeypatch.setattr(loop, "_forward_backward", real_step)
    resumed = train(_config(tiny_llama_dir, tmp_path, "cut", "full", {}, resume=True), progress=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6, rel=0)
    assert resumed.eval_loss == pytest.approx(reference.eval_loss, abs=1e-6)


def test_prompt_baseline_trains_nothing_and_scores_only_the_evaluated_turns(tiny_llama_dir, tmp_path):
    config = _config(tiny_llama_dir, tmp_path, "prompt", "prompt", {"num_examples": 2, "seed": 3})
    result = train(config, progress=False)
    assert result.global_step == 0 and step_losses(result.output_dir) == {}
    saved = json.loads((result.output_dir / "prompt_baseline.json").read_text())
    assert saved["num_examples"] == 2 and [m["role"] for m in saved["context"]][:2] == ["user", "assistant"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    _, with_shots, _ = build_datasets(config.data, tokenizer, eval_context=saved["context"])
    _, without, _ = build_datasets(config.data, tokenizer)
    # the context adds tokens but no labels: the same scored tokens as without it
    assert sum(len(s["input_ids"]) for s in with_shots) > sum(len(s["input_ids"]) for s in without)
    assert [[t for t in s["labels"] if t != -100] for s in with_shots] == \
        [[t for t in s["labels"] if t != -100] for s in without]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batches = make_batches(with_shots, 4, tokenizer.pad_token_id, False, config.data.max_seq_len, shuffle=False, seed=0)
    assert evaluate_loss(base, batches)["loss"] == pytest.approx(result.eval_loss, abs=1e-5)
