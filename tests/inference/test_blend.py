"""Blending adapters: linear / cat / svd against their definitions and against peft."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model as peft_get_peft_model
from peft.utils import set_peft_model_state_dict
from tiny_models import sample_input_ids, tiny_model

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter
from lorakit.inference import blend_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _two_adapters(r1=4, r2=4, extra_targets=()):
    torch.manual_seed(7)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=r1, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights=False), "x")
    model.add_adapter("y", LoraConfig(r=r2, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                                      target_modules=TARGETS + list(extra_targets)))
    return model


def _logits(model, adapter, ids):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_linear_with_weights_1_0_equals_first_adapter():
    model = _two_adapters()
    blend_adapters(model, ["x", "y"], [1.0, 0.0], "blend", combination_type="linear")
    ids = sample_input_ids()
    torch.testing.assert_close(_logits(model, "blend", ids), _logits(model, "x", ids), atol=FP32_ATOL, rtol=0)
    for _, layer in model.adapter_layers():
        torch.testing.assert_close(layer.get_delta_weight("blend"), layer.get_delta_weight("x"),
                                   atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(model, "x", ids), _logits(model, "y", ids), atol=1e-3)


def test_linear_refuses_unequal_ranks():
    model = _two_adapters(r1=4, r2=2)
    with pytest.raises(LorakitError, match="'linear' blending needs equal ranks"):
        blend_adapters(model, ["x", "y"], [0.5, 0.5], "blend", combination_type="linear")


def test_svd_delta_is_best_rank_k_approximation():
    model = _two_adapters(r1=4, r2=3, extra_targets=["up_proj"])
    weights, k = (0.7, -1.3), 3
    blend_adapters(model, ["x", "y"], weights, "blend", combination_type="svd", svd_rank=k)
    checked = 0
    for name, layer in model.adapter_layers():
        target = sum(w * layer.get_delta_weight(a) for a, w in zip(["x", "y"], weights) if a in layer.lora_A)
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        got = layer.get_delta_weight("blend")
        torch.testing.assert_close(got, best, atol=1e-5, rtol=0)
        # Eckart-Young: the error is exactly the discarded singular values
        torch.testing.assert_close(torch.linalg.matrix_norm(target - got), S[k:].norm(), atol=1e-4, rtol=1e-4)
        assert layer.r["blend"] == k
        checked += 1
    assert checked == 8  # q, v, down in 2 blocks + up (only in "y") in 2 blocks


def test_cat_is_exact_weighted_sum_and_matches_peft(tmp_path):
    model = _two_adapters(r1=4, r2=2)
    weights = (0.5, 2.0)
    blend_adapters(model, ["x", "y"], weights, "blend", combination_type="cat", save_directory=tmp_path / "blend")
    for _, layer in model.adapter_layers():
        expected = sum(w * layer.get_delta_weight(a) for a, w in zip(["x", "y"], weights))
        torch.testing.assert_close(layer.get_delta_weight("blend"), expected, atol=1e-6, rtol=0)
        assert layer.r["blend"] == 6

    # peft's add_weighted_adapter on the same weights gives the same logits; so does the saved file
    peft_model = peft_get_peft_model(tiny_model("llama"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "x")
    peft_model.add_adapter("y", PeftLoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=TARGETS))
    for name in ("x", "y"):
        set_peft_model_state_dict(peft_model, model.adapter_state_dict(name), adapter_name=name)
    peft_model.add_weighted_adapter(["x", "y"], list(weights), "blend", combination_type="cat")
    peft_model.set_adapter("blend")
    ids = sample_input_ids()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(_logits(model, "blend", ids), theirs, atol=FP32_ATOL, rtol=0)
    reloaded = load_adapter(tiny_model("llama"), tmp_path / "blend")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, theirs, atol=FP32_ATOL, rtol=0)


def test_linear_matches_peft_for_general_weights():
    model = _two_adapters()
    weights = (0.6, -0.9)
    blend_adapters(model, ["x", "y"], weights, "blend", combination_type="linear")
    peft_model = peft_get_peft_model(tiny_model("llama"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "x")
    peft_model.add_adapter("y", PeftLoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=TARGETS))
    for name in ("x", "y"):
        set_peft_model_state_dict(peft_model, model.adapter_state_dict(name), adapter_name=name)
    peft_model.add_weighted_adapter(["x", "y"], list(weights), "blend", combination_type="linear")
    peft_model.set_adapter("blend")
    ids = sample_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, "blend", ids), peft_model(input_ids=ids).logits,
                                   atol=FP32_ATOL, rtol=0)
