"""The fused, chunked head + cross-entropy equals the plain reference (value and gradients, fp32
atol 1e-5), on the heads of real tiny models: Llama, Qwen2, Gemma (tied and untied) and GPT-2."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model

from lorakit import LoraConfig, get_peft_model
from lorakit.data import make_batches
from lorakit.training.evaluate import batch_loss_sum, count_targets
from lorakit.training.fused_loss import linear_cross_entropy_sum

ATOL = 1e-5
CASES = [("llama", False), ("qwen2", False), ("gemma", True), ("gemma", False), ("gpt2", True)]


def _model(arch: str, tied: bool):
    model = tiny_model(arch)
    if not tied and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def _rows(model, n: int, seed: int = 0):
    """Real hidden states of the model (N, H) and random targets, as the loss sees them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, n), generator=generator)
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids)[0][0]
    return hidden.clone().requires_grad_(True), torch.randint(0, VOCAB, (n,), generator=generator)


@pytest.mark.parametrize("arch, tied", CASES)
@pytest.mark.parametrize("chunk_elements", [7 * VOCAB, 2**20])  # several chunks (last one partial), one chunk
def test_fused_loss_equals_reference_value_and_gradients(arch, tied, chunk_elements):
    model = _model(arch, tied)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)  # a trained head (tied: the embedding table) gets its gradient too
    hidden, targets = _rows(model, 37)

    ours = linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk_elements=chunk_elements)
    (ours * 0.5).backward()  # a non-unit incoming gradient
    ours_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logits = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(ours, reference, atol=ATOL * len(targets), rtol=1e-6)
    torch.testing.assert_close(ours_grads[0], hidden.grad, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours_grads[1], head.weight.grad, atol=ATOL, rtol=1e-5)


def test_fused_loss_bias_gradient_and_frozen_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    ours = linear_cross_entropy_sum(hidden, head.weight, head.bias, targets, chunk_elements=4 * 50)
    ours.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    for p in (hidden, head.weight, head.bias):
        p.grad = None
    torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum").backward()
    for mine, theirs in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=1e-5)
    head.requires_grad_(False)
    hidden.grad, head.weight.grad = None, None
    linear_cross_entropy_sum(hidden, head.weight, head.bias, targets).backward()  # frozen head: only ∂h
    assert head.weight.grad is None and hidden.grad is not None
    with torch.no_grad():  # evaluation: the value alone
        value = linear_cross_entropy_sum(hidden, head.weight, head.bias, targets)
    torch.testing.assert_close(value, ours.detach(), atol=ATOL * 9, rtol=1e-6)


@pytest.mark.parametrize("arch, tied", CASES)
def test_training_loss_through_fused_head_equals_transformers_loss(arch, tied):
    """End to end: batch_loss_sum on a LoRA model (fused head) against transformers' own loss."""
    model = get_peft_model(_model(arch, tied), LoraConfig(r=4, target_modules=ARCHS[arch][1], init_lora_weights=False))
    generator = torch.Generator().manual_seed(1)
    samples = [{"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=generator).tolist()),
                "labels": [-100] * (n // 2) + ids[n // 2:]} for n in (6, 11, 17)]
    batch = make_batches(samples, 3, 0, False, 32, shuffle=False, seed=0)[0]
    ours, n = batch_loss_sum(model, batch, "cpu")
    ours.backward()
    ours_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (model.model(**batch).loss * count_targets(batch)).backward()
    torch.testing.assert_close(ours, model.model(**batch).loss.detach() * n, atol=ATOL * n, rtol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours_grads[name], p.grad, atol=ATOL, rtol=1e-4)
