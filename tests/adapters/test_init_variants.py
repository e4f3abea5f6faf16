"""rsLoRA scaling, gaussian init and PiSSA init against peft's definitions; PiSSA saved as a
plain LoRA adapter that peft loads on the ORIGINAL base with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import ARCHS, sample_input_ids, tiny_model

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter
from lorakit.adapters.pissa import pissa_factors

ARCH_NAMES = ["llama", "gpt2"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pair(arch, seed=0, **config):
    """(lorakit model, peft model) built from the same seed with the same config."""
    config = dict(dict(r=4, lora_alpha=8, target_modules=ARCHS[arch][1]), **config)
    torch.manual_seed(seed)
    ours = get_peft_model(tiny_model(arch), LoraConfig(**config))
    torch.manual_seed(seed)
    theirs = peft_get_peft_model(tiny_model(arch), PeftLoraConfig(**config))
    return ours, theirs


def _perturb(model, std=0.05, seed=7):
    """Pretend training moved the adapter: add noise to every adapter tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_state_dict().values():
            param.add_(torch.randn(param.shape, generator=gen) * std)


# --- rsLoRA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_rslora_same_logits_gradients_and_files_as_peft(arch, tmp_path):
    ids = sample_input_ids()
    ours, theirs = _pair(arch, r=16, lora_alpha=8, use_rslora=True, init_lora_weights=False)
    layer = next(m for _, m in ours.adapter_layers())
    assert layer.scaling["default"] == pytest.approx(8 / 4)  # alpha / sqrt(r), not alpha / r = 0.5
    set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    loss_ours, loss_theirs = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=FP32_ATOL, rtol=0)
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name.replace(".default", "")], atol=FP32_ATOL, rtol=0)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)


# --- gaussian -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gaussian_init_is_peft_definition(arch):
    """peft: A ~ N(0, (1/r)²) (std 1/r, not 1/sqrt(r)), B = 0. Same seed -> identical tensors."""
    ours, theirs = _pair(arch, r=8, init_lora_weights="gaussian")
    mine, peft_state = ours.adapter_state_dict(), get_peft_model_state_dict(theirs)
    assert set(mine) == set(peft_state)
    for key, value in mine.items():
        torch.testing.assert_close(value, peft_state[key], atol=0, rtol=0)
        if "lora_B" in key:
            assert not value.any()
    A = torch.cat([v.flatten() for k, v in mine.items() if "lora_A" in k])
    assert A.std().item() == pytest.approx(1 / 8, rel=0.1)


# --- PiSSA ----------------------------------------------------------------------------------

def test_pissa_factors_reconstruct_w_and_are_principal():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    A0, B0, residual = pissa_factors(W, r=5, scaling=2.0)
    torch.testing.assert_close(residual + 2.0 * B0 @ A0, W.float(), atol=1e-5, rtol=0)
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(residual.double())[:19], S[5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals((2.0 * B0 @ A0).double())[:5], S[:5], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_pissa_init_equals_peft_and_starts_at_base(arch):
    ids = sample_input_ids()
    ours, theirs = _pair(arch, init_lora_weights="pissa")
    peft_state = get_peft_model_state_dict(theirs)
    for key, value in ours.adapter_state_dict().items():
        torch.testing.assert_close(value, peft_state[key], atol=1e-5, rtol=0)
    residual_ours = {n: p for n, p in ours.model.named_parameters() if "base_layer.weight" in n}
    residual_theirs = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    assert residual_ours
    for name, param in residual_ours.items():
        torch.testing.assert_close(param, residual_theirs[name], atol=1e-5, rtol=0)
    base = _logits(tiny_model(arch), ids)
    torch.testing.assert_close(_logits(ours, ids), base, atol=FP32_ATOL, rtol=0)
    with ours.disable_adapter():  # the frozen weights really are the residual now
        assert not torch.allclose(_logits(ours, ids), base, atol=1e-3)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_pissa_niter_fast_variant_starts_at_base(arch):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=ARCHS[arch][1],
                                                        init_lora_weights="pissa_niter_4"))
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model(arch), ids), atol=FP32_ATOL, rtol=0)
    assert any(p.abs().sum() > 0 for k, p in model.adapter_state_dict().items() if "lora_B" in k)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_saved_pissa_adapter_is_plain_lora_for_the_original_base(arch, use_rslora, tmp_path):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS[arch][1],
                                                        init_lora_weights="pissa", use_rslora=use_rslora))
    _perturb(model)
    expected = _logits(model, ids)
    assert not torch.allclose(expected, _logits(tiny_model(arch), ids), atol=1e-3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert saved["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if use_rslora else 2))
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)  # the ORIGINAL base
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=FP32_ATOL, rtol=0)
    ours = load_adapter(tiny_model(arch), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)


def test_pissa_raw_save_keeps_rank_and_rejects_bad_names(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path, convert_pissa_to_lora=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "pissa" and saved["r"] == 4
    with pytest.raises(LorakitError, match="pissa_niter_"):
        LoraConfig(init_lora_weights="pissa_fast")
