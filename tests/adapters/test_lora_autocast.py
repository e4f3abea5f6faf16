"""LoRA and DoRA layers under torch.autocast (what transformers' Trainer does with bf16=True, TRL's
default): fp32 adapter weights and gradients, and bf16 results as close to the fp32 step as
peft's layers get under the same autocast (plain LoRA: the same operations, so equal)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model as peft_get_peft_model
from peft.utils import set_peft_model_state_dict
from tiny_models import sample_input_ids, tiny_model

from lorakit import LoraConfig, get_peft_model

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _models(use_dora: bool):
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=use_dora)
    ours = get_peft_model(tiny_model("llama"), LoraConfig(**settings, init_lora_weights=False))
    theirs = peft_get_peft_model(tiny_model("llama"), PeftLoraConfig(**settings))
    assert not set_peft_model_state_dict(theirs, ours.adapter_state_dict()).unexpected_keys
    return ours, theirs


def _step(model, bf16: bool):
    """One forward (CPU bf16 autocast or fp32) and backward; (logits, {file key: grad})."""
    ids = sample_input_ids()
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            grads[key[key.index("layers."):]] = param.grad.clone()  # the same key for both wrappers
    return out.logits.detach(), grads


def _relative_error(grads: dict, exact: dict) -> float:
    return max(((grads[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_autocast_step_is_as_accurate_as_peft(use_dora):
    ours, theirs = _models(use_dora)
    exact_logits, exact = _step(ours, bf16=False)
    our_logits, our_grads = _step(ours, bf16=True)
    their_logits, their_grads = _step(theirs, bf16=True)

    assert our_logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    assert all(p.dtype == torch.float32 for p in ours.adapter_state_dict().values())
    assert all(g.dtype == torch.float32 for g in our_grads.values())  # fp32 master weights get fp32 gradients
    assert our_grads.keys() == their_grads.keys() == exact.keys()
    if not use_dora:
        assert torch.equal(our_logits, their_logits)
        assert _relative_error(our_grads, their_grads) == 0.0
    our_error, their_error = _relative_error(our_grads, exact), _relative_error(their_grads, exact)
    assert 0 < our_error <= 1.5 * their_error + 1e-3, (our_error, their_error)
    our_logit_error = (our_logits.float() - exact_logits).abs().max()
    assert our_logit_error <= 1.5 * (their_logits.float() - exact_logits).abs().max() + 1e-3
