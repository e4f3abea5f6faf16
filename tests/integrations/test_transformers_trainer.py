"""lorakit models in transformers' Trainer (lorakit.integrations.transformers): checkpoints every
2 of 4 steps, save_model and resume_from_checkpoint write and read peft's layout; the real peft
loads the files with the same logits; a resumed run ends with exactly the uninterrupted adapter."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from trainer_flow import (ADAPTERS, STEPS, adapted_llama, adapter_values, max_difference, run_args, tied_llama,
                          token_dataset)

from lorakit import (AdaLoraConfig, BottleneckConfig, FullConfig, LorakitError, PrefixTuningConfig, QLoraConfig,
                     get_peft_model, load_adapter)
from lorakit.integrations.transformers import Trainer, with_adapters

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(kind: str, output_dir, resume_from=None, eval_dataset=None, **args):
    model = adapted_llama(kind)
    trainer = Trainer(model=model, args=run_args(output_dir, **args), train_dataset=token_dataset(),
                      eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return trainer, model


def _assert_peft_layout(directory, model) -> None:
    """Only the adapter's files (no full-model weights), with peft's tensor names."""
    names = {p.name for p in directory.iterdir()}
    assert PEFT_FILES <= names and "model.safetensors" not in names
    keys = set(load_file(directory / "adapter_model.safetensors"))
    assert keys == set(model.adapter_state_dict())
    assert all(key.startswith("base_model.model.") for key in keys)
    assert json.loads((directory / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_checkpoints_save_and_resume_in_peft_layout(kind, tmp_path):
    out = tmp_path / "run"
    trainer, model = _train(kind, out)
    trainer.save_model()
    for directory in (out / "checkpoint-2", out / f"checkpoint-{STEPS}", out):
        _assert_peft_layout(directory, model)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= \
        {p.name for p in (out / "checkpoint-2").iterdir()}  # Trainer's own part of a checkpoint

    # the real peft reads the final adapter and a checkpoint and computes what lorakit computes
    trained = _logits(model)
    assert torch.allclose(_logits(PeftModel.from_pretrained(tied_llama(), out)), trained, atol=1e-6)
    at_step_2 = _logits(load_adapter(tied_llama(), out / "checkpoint-2"))
    assert torch.allclose(_logits(PeftModel.from_pretrained(tied_llama(), out / "checkpoint-2")), at_step_2, atol=1e-6)
    assert not torch.allclose(at_step_2, trained, atol=1e-4)  # the checkpoint is the step-2 adapter, not the last

    # resuming from checkpoint-2 ends exactly where the uninterrupted run ended
    _, resumed = _train(kind, tmp_path / "resumed", resume_from=out / "checkpoint-2")
    assert max_difference(adapter_values(resumed), adapter_values(model)) <= 1e-6
    assert max_difference(adapter_values(adapted_llama(kind)), adapter_values(model)) > 1e-3  # training moved it


def test_resume_restores_the_adapter_not_just_the_optimizer(tmp_path):
    """The same resume with the adapter load skipped ends elsewhere, so the equality above is the
    adapter coming back from the checkpoint."""
    out = tmp_path / "run"
    _, model = _train("lora", out)
    skipping = with_adapters(transformers.Trainer)
    fresh = adapted_llama("lora")
    trainer = skipping(model=fresh, args=run_args(tmp_path / "skip"), train_dataset=token_dataset())
    trainer._load_from_checkpoint = lambda *args, **kwargs: None
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert max_difference(adapter_values(fresh), adapter_values(model)) > 1e-3


def test_evaluate_reports_the_models_loss(tmp_path):
    """Trainer finds the label names on the causal LM inside the adapted model: eval_loss is the
    mean of the model's own batch losses."""
    model = adapted_llama("lora")
    data = token_dataset(rows=8)
    trainer = Trainer(model=model, args=run_args(tmp_path, per_device_eval_batch_size=4), train_dataset=data)
    reported = trainer.evaluate(data)["eval_loss"]
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor(data["input_ids"][i:i + 4]),
                        labels=torch.tensor(data["labels"][i:i + 4])).loss for i in (0, 4)]
    assert reported == pytest.approx(torch.stack(losses).mean().item(), abs=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    # "best" = highest eval loss here, so the best checkpoint is not the last one (loss falls)
    trainer, model = _train("lora", tmp_path, eval_dataset=token_dataset(rows=4), eval_strategy="steps", eval_steps=2,
                            load_best_model_at_end=True,
                            metric_for_best_model="eval_loss", greater_is_better=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(f"{best}/adapter_model.safetensors")
    assert max_difference(adapter_values(model), saved) == 0.0
    last = load_file(tmp_path / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert max_difference(adapter_values(model), last) > 1e-4  # it really went back to step 2


def test_plain_transformers_model_keeps_trainers_own_path(tmp_path):
    trainer = Trainer(model=tied_llama(), args=run_args(tmp_path, max_steps=1), train_dataset=token_dataset())
    trainer.train()
    trainer.save_model()
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and "adapter_model.safetensors" not in names


def test_resume_from_a_directory_without_an_adapter_is_one_clear_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(LorakitError, match="has no adapter_model.safetensors"):
        _train("lora", tmp_path / "run", resume_from=tmp_path / "checkpoint-2")


def test_resume_from_another_adapters_checkpoint_names_the_tensor_and_changes_nothing(tmp_path):
    _train("lora", tmp_path / "lora")
    model = adapted_llama("dora")
    before = adapter_values(model)
    trainer = Trainer(model=model, args=run_args(tmp_path / "dora"), train_dataset=token_dataset())
    with pytest.raises(LorakitError, match="lora_magnitude_vector"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "lora" / "checkpoint-2"))
    assert max_difference(adapter_values(model), before) == 0.0


def test_with_adapters_refuses_what_is_not_a_trainer():
    with pytest.raises(LorakitError, match="transformers.Trainer or a subclass"):
        with_adapters(dict)
    assert with_adapters(transformers.Trainer) is Trainer


OTHER_METHODS = {
    # AdaLoRA: rank allocation after every optimizer step (the contract's after_optimizer_step), its
    # allocator state in checkpoints; QLoRA: a 4-bit base; the others: their own wrappers and files
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=STEPS,
                                     target_modules=["q_proj", "v_proj"]),
    "qlora": lambda: QLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "adapter": lambda: BottleneckConfig(reduction_factor=4),
    "full": lambda: FullConfig(),
}


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_every_method_resumes_to_the_uninterrupted_result(method, tmp_path):
    def run(output_dir, resume_from=None):
        base = tied_llama()
        torch.manual_seed(1)
        model = get_peft_model(base, OTHER_METHODS[method]())
        trainer = Trainer(model=model, args=run_args(output_dir), train_dataset=token_dataset())
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer, {key: value.detach().clone() for key, value in model.trainable_tensors().items()}

    trainer, finished = run(tmp_path / "run")
    trainer.save_model()
    _, resumed = run(tmp_path / "resumed", resume_from=str(tmp_path / "run" / "checkpoint-2"))
    assert max_difference(resumed, finished) == 0.0
    torch.manual_seed(1)
    start = get_peft_model(tied_llama(), OTHER_METHODS[method]()).trainable_tensors()
    assert max_difference(start, finished) > 1e-3
    if method == "adalora":
        assert (tmp_path / "run" / "checkpoint-2" / "method_state.pt").is_file()
        kept = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["rank_pattern"]
        assert kept and all(sum(mask) == 2 for mask in kept.values())  # allocated down to target_r by step 4
