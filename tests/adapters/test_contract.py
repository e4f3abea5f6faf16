"""The contract every registered adapter method keeps (DESIGN.md, testing tier 2).

Adding a method = one row in METHOD_CASES: a factory for an initial ("identity") config and
one for a non-trivial config. A registered method without a row fails
``test_every_registered_method_has_a_row``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import PeftModel
from tiny_models import sample_input_ids, tiny_model

from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters import ADAPTER_METHODS
from lorakit.adapters.adalora import AdaLoraConfig

# method name -> (config at its default init, config with non-zero update)
METHOD_CASES = {
    "lora": (lambda targets: LoraConfig(r=4, target_modules=targets),
             lambda targets: LoraConfig(r=4, target_modules=targets, init_lora_weights=False)),
    # qlora attaches LoRA (LoraConfig) over an NF4 base; the quantized base's checks are in test_qlora.py
    "qlora": (lambda targets: LoraConfig(r=4, target_modules=targets),
              lambda targets: LoraConfig(r=4, target_modules=targets, init_lora_weights=False)),
    "adalora": (lambda targets: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets),
                lambda targets: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets)),
}
ARCH_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
CASES = [(method, arch) for method in METHOD_CASES for arch in ARCH_TARGETS]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapted(method, arch, trivial=False):
    identity, nontrivial = METHOD_CASES[method]
    config = (identity if trivial else nontrivial)(ARCH_TARGETS[arch])
    model = get_peft_model(tiny_model(arch), config)
    if not trivial:
        with torch.no_grad():  # some methods (e.g. AdaLoRA) start at zero even when randomised
            for param in model.adapter_state_dict().values():
                if param.abs().sum() == 0:
                    param.normal_(std=0.1)
    return model


def test_every_registered_method_has_a_row():
    assert set(ADAPTER_METHODS) <= set(METHOD_CASES), "add a row to METHOD_CASES for each new method"


@pytest.mark.parametrize("method,arch", CASES)
def test_initial_adapter_equals_base(method, arch):
    ids = sample_input_ids()
    torch.testing.assert_close(_logits(_adapted(method, arch, trivial=True), ids), _logits(tiny_model(arch), ids),
                               atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("method,arch", CASES)
def test_disabled_adapter_equals_base(method, arch):
    ids = sample_input_ids()
    model = _adapted(method, arch)
    assert not torch.allclose(_logits(model, ids), _logits(tiny_model(arch), ids), atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), _logits(tiny_model(arch), ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("method,arch", CASES)
def test_merge_unmerge_restores_weights_and_merged_equals_unmerged(method, arch):
    ids = sample_input_ids()
    model = _adapted(method, arch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=FP32_ATOL, rtol=0)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,arch", CASES)
def test_save_load_round_trip_is_exact_and_peft_loads_it(method, arch, tmp_path):
    ids = sample_input_ids()
    model = _adapted(method, arch)
    model.save_pretrained(tmp_path)
    reloaded = load_adapter(tiny_model(arch), tmp_path)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), atol=FP32_ATOL, rtol=0)
