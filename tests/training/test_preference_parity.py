"""Parity with TRL: lorakit's DPO, IPO, SimPO, ORPO and KTO losses and adapter gradients equal
TRL's trainers (DPOTrainer, experimental CPOTrainer / ORPOTrainer, KTOTrainer) around a peft
adapter holding the same weights, on the same batch (tiny Llama and GPT-2, fp32: loss atol 1e-5,
gradients 1e-4 relative)."""

from __future__ import annotations

import pytest
import torch
from preference_helpers import (PAD, assert_grads_close, lorakit_samples, random_examples, same_adapter,
                                text_dataset, trl_kto_examples, twin_models)

from lorakit.data.preference import collate_kto, collate_pairs
from lorakit.training.objectives import make_objective
from lorakit.training.objectives.kto import KtoObjective
from lorakit.training.objectives.pairwise import PairObjective
from lorakit.training.preference import Reference

ARCHS = ["llama", "gpt2"]
LOSS_ATOL = 1e-5


def _ours(objective, model, batch):
    totals = objective.prepare_step(model, [batch], objective.totals([batch]), "cpu", dict)
    share, _ = objective.loss(model, batch, totals, "cpu")
    return share


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path), report_to=[], per_device_train_batch_size=4, use_cpu=True,
                bf16=False, logging_steps=1, save_strategy="no")


def _dpo_trainer(base, peft_config, tokenizer, tmp_path, loss_type, beta):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_common_args(tmp_path), loss_type=[loss_type], beta=beta)
    return DPOTrainer(model=base, args=args, train_dataset=text_dataset(), processing_class=tokenizer,
                      peft_config=peft_config)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective,beta", [("dpo", 0.1), ("dpo", 0.5), ("ipo", 0.3)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(arch, objective, beta, smol_tokenizer, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours, base, peft_config = twin_models(arch)
    examples = random_examples(5, seed=11)
    loss_type = "sigmoid" if objective == "dpo" else "ipo"
    trainer = _dpo_trainer(base, peft_config, smol_tokenizer, tmp_path, loss_type, beta)
    expected = trainer.compute_loss(same_adapter(trainer, ours), DataCollatorForPreference(pad_token_id=PAD)(examples))
    expected.backward()
    mine = _ours(PairObjective(objective, beta, reference=Reference(model=ours)), ours,
                 collate_pairs(lorakit_samples(examples), PAD))
    mine.backward()
    torch.testing.assert_close(mine, expected.float(), atol=LOSS_ATOL, rtol=0)
    assert_grads_close(ours, trainer.model)


def _trl_pair_batch(batch):
    """lorakit's [chosen; rejected] rows as the chosen_* / rejected_* tensors of TRL's CPO / ORPO trainers."""
    pairs = batch["input_ids"].shape[0] // 2
    return {f"{side}_{key}": batch[key][part] for side, part in (("chosen", slice(0, pairs)),
                                                                  ("rejected", slice(pairs, None)))
            for key in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cpo_alpha,label_smoothing", [(0.0, 0.0), (1.0, 0.1)])
def test_simpo_equals_trl_cpo_trainer(arch, cpo_alpha, label_smoothing, smol_tokenizer, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    ours, base, peft_config = twin_models(arch)
    batch = collate_pairs(lorakit_samples(random_examples(5, seed=12)), PAD)
    args = CPOConfig(**_common_args(tmp_path), loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=cpo_alpha,
                     label_smoothing=label_smoothing)
    trainer = CPOTrainer(model=base, args=args, train_dataset=text_dataset(), processing_class=smol_tokenizer,
                         peft_config=peft_config)
    expected, _ = trainer.get_batch_loss_metrics(same_adapter(trainer, ours), _trl_pair_batch(batch))
    expected.backward()
    objective = PairObjective("simpo", 2.0, label_smoothing=label_smoothing, simpo_gamma=0.7, cpo_alpha=cpo_alpha)
    mine = _ours(objective, ours, batch)
    mine.backward()
    torch.testing.assert_close(mine, expected.float(), atol=LOSS_ATOL, rtol=0)
    assert_grads_close(ours, trainer.model)


@pytest.mark.parametrize("arch", ARCHS)
def test_orpo_equals_trl_orpo_trainer(arch, smol_tokenizer, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ours, base, peft_config = twin_models(arch)
    batch = collate_pairs(lorakit_samples(random_examples(5, seed=13)), PAD)
    args = ORPOConfig(**_common_args(tmp_path), beta=0.25)
    trainer = ORPOTrainer(model=base, args=args, train_dataset=text_dataset(), processing_class=smol_tokenizer,
                          peft_config=peft_config)
    expected, _ = trainer.get_batch_loss_metrics(same_adapter(trainer, ours), _trl_pair_batch(batch))
    expected.backward()
    mine = _ours(PairObjective("orpo", 0.25), ours, batch)
    mine.backward()
    torch.testing.assert_close(mine, expected.float(), atol=LOSS_ATOL, rtol=0)
    assert_grads_close(ours, trainer.model)


@pytest.mark.parametrize("arch", ARCHS)
def test_kto_equals_trl_kto_trainer(arch, smol_tokenizer, tmp_path):
    from trl import KTOConfig, KTOTrainer

    ours, base, peft_config = twin_models(arch)
    examples = random_examples(6, seed=18, kto=True)  # a seed where the KL estimate is > 0 on both models
    args = KTOConfig(**_common_args(tmp_path), beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    trainer = KTOTrainer(model=base, args=args, train_dataset=text_dataset(kto=True), processing_class=smol_tokenizer,
                         peft_config=peft_config)
    expected = trainer.compute_loss(same_adapter(trainer, ours), trainer.data_collator(trl_kto_examples(examples)))
    expected.backward()
    objective = KtoObjective(0.2, 1.3, 0.7, Reference(model=ours))
    # the KL estimate z enters the loss only when positive (it is clamped at 0)
    batch = collate_kto(lorakit_samples(examples), PAD)
    totals = objective.prepare_step(ours, [batch], objective.totals([batch]), "cpu", dict)
    assert totals["kl"] > 0
    mine = _ours(objective, ours, batch)
    mine.backward()
    torch.testing.assert_close(mine, expected.float(), atol=LOSS_ATOL, rtol=0)
    assert_grads_close(ours, trainer.model)


def test_objective_factory_reads_trl_names_from_the_config():
    from lorakit.config import TrainArgs

    objective = make_objective(TrainArgs(objective="simpo", beta=2.5, simpo_gamma=0.3, cpo_alpha=0.5))
    assert (objective.name, objective.beta, objective.simpo_gamma, objective.nll_weight) == ("simpo", 2.5, 0.3, 0.5)
    assert make_objective(TrainArgs(objective="orpo", beta=0.2)).nll_weight == 1.0


def test_dpo_label_smoothing_is_the_expected_loss_under_flipped_preferences():
    """cDPO: with ε the loss is the DPO loss of the pair as given with probability 1-ε and of the
    pair flipped (rejected preferred) with probability ε. (TRL 1.13's DPO sigmoid loss ignores ε.)"""
    from lorakit.training.objectives.losses import dpo_losses

    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(8, generator=generator) * 5, torch.randn(8, generator=generator) * 5
    smoothed = dpo_losses(chosen, rejected, 0.3, label_smoothing=0.2)
    expected = 0.8 * dpo_losses(chosen, rejected, 0.3) + 0.2 * dpo_losses(rejected, chosen, 0.3)
    torch.testing.assert_close(smoothed, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(smoothed, dpo_losses(chosen, rejected, 0.3))
