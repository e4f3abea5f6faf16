"""lorakit models in TRL's SFTTrainer (lorakit.integrations.trl): the same guarantees as in
transformers' Trainer (checkpoints and save_model in peft's layout, peft loads them, resume equals
an uninterrupted run), and the same training as TRL's SFTTrainer with a peft adapter."""

from __future__ import annotations

import pytest
import torch
import trl
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from trainer_flow import (ADAPTERS, STEPS, adapted_llama, adapter_values, chat_dataset, max_difference, run_args,
                          tied_llama)
from trl import SFTConfig

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter
from lorakit.integrations.trl import SFTTrainer


@pytest.fixture(scope="module")
def vocab(smol_tokenizer):
    """The tiny Llama's vocabulary and special ids are the real SmolLM2 tokenizer's."""
    return dict(vocab_size=len(smol_tokenizer), pad=smol_tokenizer.pad_token_id, bos=smol_tokenizer.bos_token_id,
                eos=smol_tokenizer.eos_token_id)


def _sft(model, tokenizer, output_dir, trainer_class=SFTTrainer, resume_from=None):
    args = run_args(output_dir, SFTConfig, max_length=64)  # SFTConfig's default loss: chunked_nll
    trainer = trainer_class(model=model, args=args, train_dataset=chat_dataset(), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return trainer


def _logits(model, vocab_size):
    ids = torch.randint(3, vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["lora"])  # DoRA and modules_to_save: test_transformers_trainer (same path)
def test_sft_checkpoints_save_and_resume_in_peft_layout(kind, tmp_path, smol_tokenizer, vocab):
    out = tmp_path / "run"
    model = adapted_llama(kind, **vocab)
    trainer = _sft(model, smol_tokenizer, out)
    trainer.save_model()
    for directory in (out / "checkpoint-2", out / f"checkpoint-{STEPS}", out):
        names = {p.name for p in directory.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
        assert set(load_file(directory / "adapter_model.safetensors")) == set(model.adapter_state_dict())
    assert (out / "tokenizer.json").is_file()  # SFTTrainer's processing class is saved with the adapter

    trained = _logits(model, vocab["vocab_size"])
    assert torch.allclose(_logits(PeftModel.from_pretrained(tied_llama(**vocab), out), vocab["vocab_size"]),
                          trained, atol=1e-6)
    at_step_2 = load_adapter(tied_llama(**vocab), out / "checkpoint-2")
    by_peft = PeftModel.from_pretrained(tied_llama(**vocab), out / "checkpoint-2")
    assert torch.allclose(_logits(by_peft, vocab["vocab_size"]), _logits(at_step_2, vocab["vocab_size"]), atol=1e-6)

    resumed = adapted_llama(kind, **vocab)
    _sft(resumed, smol_tokenizer, tmp_path / "resumed", resume_from=out / "checkpoint-2")
    assert max_difference(adapter_values(resumed), adapter_values(model)) <= 1e-6
    assert max_difference(adapter_values(adapted_llama(kind, **vocab)), adapter_values(model)) > 1e-3


def test_sft_trains_as_trl_does_with_a_peft_adapter(tmp_path, smol_tokenizer, vocab):
    """Same start, same data, same SFTConfig (chunked loss): lorakit's adapter after 4 steps equals
    the one TRL's own SFTTrainer trains with peft, and the logged losses agree."""
    ours = adapted_llama("lora", **vocab)
    settings = ADAPTERS["lora"]
    theirs = peft_get_peft_model(tied_llama(**vocab), PeftLoraConfig(
        r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
        lora_dropout=0.0))
    result = set_peft_model_state_dict(theirs, adapter_values(ours))
    assert not result.unexpected_keys

    our_run = _sft(ours, smol_tokenizer, tmp_path / "ours")
    their_run = _sft(theirs, smol_tokenizer, tmp_path / "theirs", trainer_class=trl.SFTTrainer)
    their_adapter = {key: value.detach() for key, value in get_peft_model_state_dict(theirs).items()}
    assert max_difference(adapter_values(ours), their_adapter) <= 1e-5
    assert max_difference(adapter_values(adapted_llama("lora", **vocab)), adapter_values(ours)) > 1e-3

    def losses(trainer):
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses(our_run)) == STEPS
    assert losses(our_run) == pytest.approx(losses(their_run), abs=1e-5)


@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_chunked_loss_refuses_an_adapted_output_head(head, tmp_path, smol_tokenizer, vocab):
    """The chunked loss multiplies by lm_head.weight itself and would skip an adapter on the head:
    one clear error at construction; the plain loss trains the head's adapter."""
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0,
                    target_modules=["q_proj", "lm_head"] if head == "lora" else ["q_proj"],
                    modules_to_save=["lm_head"] if head == "modules_to_save" else None)

    def build(**extra):
        model = get_peft_model(tied_llama(**vocab), LoraConfig(**settings))
        return SFTTrainer(model=model, args=run_args(tmp_path, SFTConfig, max_length=64, **extra),
                          train_dataset=chat_dataset(), processing_class=smol_tokenizer)
    with pytest.raises(LorakitError, match="loss_type='nll'"):
        build()
    trainer = build(loss_type="nll", max_steps=1, save_strategy="no")
    before = {k: v for k, v in adapter_values(trainer.model).items() if ".lm_head." in k}
    trainer.train()
    after = {k: v for k, v in adapter_values(trainer.model).items() if ".lm_head." in k}
    assert before and max_difference(before, after) > 0  # the head's adapter trained
