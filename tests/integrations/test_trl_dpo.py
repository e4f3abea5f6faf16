"""lorakit models in TRL's DPOTrainer (lorakit.integrations.trl): the reference is the same model
with its adapters off (no second copy), training equals TRL's DPOTrainer with a peft adapter, and
checkpoints / save_model / resume behave as in transformers' Trainer."""

from __future__ import annotations

import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from trainer_flow import ADAPTERS, STEPS, adapted_llama, adapter_values, max_difference, run_args, tied_llama
from trl import DPOConfig

from lorakit.integrations.trl import AdapterOffReference, DPOTrainer


@pytest.fixture(scope="module")
def vocab(smol_tokenizer):
    return dict(vocab_size=len(smol_tokenizer), pad=smol_tokenizer.pad_token_id, bos=smol_tokenizer.bos_token_id,
                eos=smol_tokenizer.eos_token_id)


def _preferences(rows: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                               "rejected": f" It is {2 * i + 1}."} for i in range(rows)])


def _dpo(model, tokenizer, output_dir, trainer_class=DPOTrainer, resume_from=None):
    args = run_args(output_dir, DPOConfig, max_length=64)
    trainer = trainer_class(model=model, args=args, train_dataset=_preferences(), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return trainer


def _losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_reference_is_the_base_model_and_leaves_the_adapter_trainable(vocab):
    model = adapted_llama("lora", **vocab)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # an adapter that changes the output
    reference = AdapterOffReference(model)
    reference.eval().requires_grad_(False)  # what a trainer does to its reference model
    assert list(reference.parameters()) == []
    ids = torch.randint(3, vocab["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tied_llama(**vocab)(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        assert torch.allclose(reference(input_ids=ids).logits, expected, atol=1e-6)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert model.training and all(p.requires_grad for p in model.adapter_state_dict().values())


def test_dpo_trains_as_trl_does_with_a_peft_adapter(tmp_path, smol_tokenizer, vocab):
    ours = adapted_llama("lora", **vocab)
    settings = ADAPTERS["lora"]
    theirs = peft_get_peft_model(tied_llama(**vocab), PeftLoraConfig(
        r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
        lora_dropout=0.0))
    assert not set_peft_model_state_dict(theirs, adapter_values(ours)).unexpected_keys

    our_run = _dpo(ours, smol_tokenizer, tmp_path / "ours")
    their_run = _dpo(theirs, smol_tokenizer, tmp_path / "theirs", trainer_class=trl.DPOTrainer)
    assert len(_losses(our_run)) == STEPS
    assert _losses(our_run) == pytest.approx(_losses(their_run), abs=1e-5)
    their_adapter = {key: value.detach() for key, value in get_peft_model_state_dict(theirs).items()}
    assert max_difference(adapter_values(ours), their_adapter) <= 1e-5
    assert max_difference(adapter_values(adapted_llama("lora", **vocab)), adapter_values(ours)) > 1e-4


def test_dpo_checkpoints_save_and_resume(tmp_path, smol_tokenizer, vocab):
    out = tmp_path / "run"
    model = adapted_llama("lora", **vocab)
    trainer = _dpo(model, smol_tokenizer, out)
    trainer.save_model()
    ids = torch.randint(3, vocab["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))
    by_peft = PeftModel.from_pretrained(tied_llama(**vocab), out).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(by_peft(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)

    resumed = adapted_llama("lora", **vocab)
    _dpo(resumed, smol_tokenizer, tmp_path / "resumed", resume_from=out / "checkpoint-2")
    assert max_difference(adapter_values(resumed), adapter_values(model)) <= 1e-6


def test_precomputed_reference_log_probs_give_the_same_run(tmp_path, smol_tokenizer, vocab):
    """precompute_ref_log_probs=True runs the reference once over the data before training; the
    adapter-off reference then gives the same losses and adapter as computing it every step."""
    runs = []
    for precompute in (False, True):
        model = adapted_llama("lora", **vocab)
        args = run_args(tmp_path / str(precompute), DPOConfig, max_length=64, save_strategy="no",
                        precompute_ref_log_probs=precompute)
        trainer = DPOTrainer(model=model, args=args, train_dataset=_preferences(), processing_class=smol_tokenizer)
        trainer.train()
        runs.append((_losses(trainer), adapter_values(model)))
    (losses, adapter), (precomputed_losses, precomputed_adapter) = runs
    assert precomputed_losses == pytest.approx(losses, abs=1e-6)
    assert max_difference(precomputed_adapter, adapter) <= 1e-6
    assert losses[-1] != pytest.approx(0.693147, abs=1e-5)  # the reference is not the moving policy (loss ln 2)
