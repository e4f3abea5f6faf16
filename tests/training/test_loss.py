"""The training loss: logits only on labelled positions equal the model's own loss (value and
gradients), on padded and packed batches; gradient accumulation equals one big batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FP32_ATOL
from lorakit_tiny import step_losses, tiny_config_dict, tiny_llama_dir  # noqa: F401 (fixture)
from safetensors.torch import load_file
from tiny_models import ARCHS, VOCAB, tiny_model

from lorakit import LoraConfig, get_peft_model
from lorakit.config import TrainingConfig
from lorakit.data import make_batches
from lorakit.training import train
from lorakit.training.evaluate import _plain_head_model, batch_loss_sum, count_targets


def _samples(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = 5 + i * 2
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]  # a masked "prompt" half
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("packing", [False, True])
def test_labelled_positions_loss_equals_model_loss(arch, packing):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=ARCHS[arch][1], init_lora_weights=False))
    assert _plain_head_model(model) is not None
    batch = make_batches(_samples(), 3, 0, packing, 32, shuffle=False, seed=0)[0]
    ours, n = batch_loss_sum(model, batch, "cpu")
    ours.backward()
    ours_grads = _grads(model)
    model.zero_grad()
    reference = model.model(**batch).loss * count_targets(batch)  # transformers' own loss path
    reference.backward()
    assert n == count_targets(batch) > 0
    torch.testing.assert_close(ours, reference, atol=FP32_ATOL * n, rtol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(ours_grads[name], grad, atol=FP32_ATOL, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tiny_llama_dir, tmp_path):
    def run(name, **args):
        data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, max_steps=3, **args)
        # the same samples in the same order per step: no packing (whole rows per batch) and no
        # length grouping (its pools depend on batch_size)
        data["data"].update(max_seq_len=96, packing=False, group_by_length=False)
        return train(TrainingConfig.from_dict(data), progress=False)

    big = run("big", batch_size=4, grad_accum=1)
    accumulated = run("accum", batch_size=2, grad_accum=2)  # same samples per step, padded differently
    for step in (1, 2, 3):
        assert accumulated.losses[step] == pytest.approx(big.losses[step], abs=1e-5)
    assert step_losses(accumulated.output_dir) == pytest.approx(step_losses(big.output_dir), abs=1e-5)
    ours = load_file(accumulated.output_dir / "adapter_model.safetensors")
    theirs = load_file(big.output_dir / "adapter_model.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)
    assert any(theirs[k].abs().max() > 0 for k in theirs if "lora_B" in k)  # training moved B off zero


def test_gradient_checkpointing_gives_the_same_losses(tiny_llama_dir, tmp_path):
    def run(name, **args):
        data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / name, max_steps=2, batch_size=2, **args)
        data["data"]["max_seq_len"] = 96
        return train(TrainingConfig.from_dict(data), progress=False).losses

    plain, checkpointed = run("plain"), run("ckpt", grad_checkpointing=True)
    assert checkpointed == pytest.approx(plain, abs=1e-6)


def test_bf16_precision_keeps_base_in_bf16_and_adapters_and_optimizer_in_fp32(tiny_llama_dir, tmp_path):
    from lorakit.training.loop import inject_adapters, load_base
    from lorakit.training.optim import make_optimizer

    data = tiny_config_dict(tiny_llama_dir, tmp_path, tmp_path / "bf16", precision="bf16")
    config = TrainingConfig.from_dict(data)
    base, _ = load_base(config)
    model = inject_adapters(base, config, total_steps=1)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    optimizer = make_optimizer(model, 1e-3, 0.0)
    ids = torch.randint(3, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    states = [s for s in optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
