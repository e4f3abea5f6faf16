"""Reference equivalence with the real peft library on six architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import ARCHS, sample_input_ids, tiny_model

from lorakit import LoraConfig, get_peft_model, load_adapter

ARCH_NAMES = list(ARCHS)


def _config(arch: str, cls, **extra):
    return cls(r=4, lora_alpha=8, target_modules=ARCHS[arch][1], init_lora_weights=False, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lorakit_adapter_loads_in_peft_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), _config(arch, LoraConfig))
    ours.save_pretrained(tmp_path)
    expected = _logits(ours, ids)

    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    result = set_peft_model_state_dict(theirs, load_file(tmp_path / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=FP32_ATOL, rtol=0)
    assert not torch.allclose(expected, _logits(tiny_model(arch), ids), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_adapter_loads_in_lorakit_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    theirs = peft_get_peft_model(tiny_model(arch), _config(arch, PeftLoraConfig)).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_same_weights_same_forward_and_gradients_as_peft(arch):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), _config(arch, LoraConfig))
    theirs = peft_get_peft_model(tiny_model(arch), _config(arch, PeftLoraConfig))
    set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    loss_ours = ours(input_ids=ids, labels=ids).loss
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=FP32_ATOL, rtol=0)
    loss_ours.backward()
    loss_theirs.backward()
    grads_theirs = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads_theirs[name.replace(".default", "")], atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_merge_unmerge_and_merged_logits(arch):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model(arch), _config(arch, LoraConfig))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=FP32_ATOL, rtol=0)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)
    merged_plain = copy.deepcopy(model).merge_and_unload()
    assert not any("lora_" in n for n, _ in merged_plain.named_parameters())
    torch.testing.assert_close(_logits(merged_plain, ids), unmerged, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_zero_initialised_b_gives_exact_base_logits(arch):
    ids = sample_input_ids()
    base_logits = _logits(tiny_model(arch), ids)
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(_logits(model, ids), base_logits)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    assert not torch.allclose(_logits(model, ids), base_logits)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base_logits)
