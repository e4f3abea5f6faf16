"""QLoRA: LoRA over a bitsandbytes NF4 (double-quantized) base, on CPU.

What must hold: the quantized base's forward is the LoRA forward over the dequantized weight;
the NF4 error of a random matrix is what NF4's code book allows; merging dequantizes (never
re-quantizes); the saved adapter is plain LoRA; the built-in model's base weights shrink."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FP32_ATOL
from peft import PeftModel
from tiny_models import ARCHS, sample_input_ids, tiny_model
from torch import nn

from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters import get_method
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.qlora import (base_weight_memory, dequantize_base, dequantize_weight, is_quantized,
                                    quantize_base, quantize_linear)

bnb = pytest.importorskip("bitsandbytes")
ARCH_NAMES = ["llama", "gpt2"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _qlora_model(arch, compute_dtype="float32", seed=0):
    model = quantize_base(tiny_model(arch), "nf4", compute_dtype=compute_dtype)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS[arch][1], init_lora_weights=False))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_nf4_base_forward_equals_lora_over_dequantized_weight(arch):
    ids = sample_input_ids()
    model = _qlora_model(arch)
    quantized = [m for m in model.modules() if is_quantized(m)]
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    reference = dequantize_base(copy.deepcopy(model), torch.float32)  # same adapters over dense W = deq(Q(W))
    assert not any(is_quantized(m) for m in reference.modules())
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=FP32_ATOL, rtol=0)


def test_bf16_compute_matches_dense_bf16_reference():
    """compute_dtype bf16: the base matmul runs in bf16; compare with the same bf16 matmul."""
    torch.manual_seed(0)
    layer = LoraLayer(quantize_linear(nn.Linear(64, 48), "nf4", compute_dtype=torch.bfloat16))
    layer.add_adapter("default", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 7, 64)
    W = dequantize_weight(layer.base_layer).to(torch.bfloat16)
    base = nn.functional.linear(x.to(torch.bfloat16), W, layer.base_layer.bias.to(torch.bfloat16)).float()
    expected = base + layer.adapter_output("default", x)
    torch.testing.assert_close(layer(x), expected, atol=1e-2, rtol=1e-2)


def test_nf4_quantization_error_is_in_the_expected_range():
    """NF4 maps each block of 64 weights to 16 levels in [-1, 1] times the block's absmax a.
    The widest gap between NF4 levels is [-1, -0.6962] (0.3038), so rounding to the nearest
    level errs by at most 0.1519·a; double quantization stores a itself with 8 bits, adding
    |a - â| (â is the stored absmax). For N(0, σ²) weights the levels are the normal's
    quantiles, so the relative Frobenius error is about 0.09 (and below FP4's ≈ 0.12)."""
    torch.manual_seed(0)
    W = torch.randn(256, 512) * 0.02
    errors = {}
    for quant in ("nf4", "fp4"):
        layer = quantize_linear(_linear_with(W), quant)
        deq = dequantize_weight(layer).float()
        errors[quant] = ((deq - W).norm() / W.norm()).item()
        if quant == "nf4":
            state = layer.weight.quant_state
            stored_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            absmax = W.reshape(-1, 64).abs().amax(dim=1)
            bound = 0.1519 * absmax + (stored_absmax - absmax).abs() + 1e-7
            assert ((deq - W).reshape(-1, 64).abs().amax(dim=1) <= bound).all()
    assert 0.07 < errors["nf4"] < 0.11, errors
    assert errors["nf4"] < errors["fp4"], errors


def _linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_qlora_trains_only_fp32_adapters():
    ids = sample_input_ids()
    model = _qlora_model("llama", compute_dtype="bfloat16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_merge_dequantizes_and_never_requantizes(arch):
    ids = sample_input_ids()
    model = _qlora_model(arch)
    expected = _logits(model, ids)
    merged = model.merge_and_unload()
    adapted = [m for n, m in merged.named_modules() if n.endswith(ARCHS[arch][1][0])]
    assert adapted and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in adapted)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=FP32_ATOL, rtol=0)
    assert any(is_quantized(m) for m in merged.modules())  # layers without adapters are left as they were
    dense = dequantize_base(merged)  # ... until the user asks for a fully dense model
    assert not any(is_quantized(m) for m in dense.modules())
    torch.testing.assert_close(_logits(dense, ids), expected, atol=FP32_ATOL, rtol=0)


def test_merged_dtype_is_the_dtype_before_quantization():
    layer = LoraLayer(quantize_linear(nn.Linear(32, 16).to(torch.bfloat16), "nf4"))
    layer.add_adapter("default", r=2, lora_alpha=2, init_lora_weights=False)
    layer.merge()
    assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_saved_adapter_is_plain_lora_and_matches_peft_on_dequantized_base(arch, tmp_path):
    ids = sample_input_ids()
    model = _qlora_model(arch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    expected = _logits(model, ids)
    ours = load_adapter(quantize_base(tiny_model(arch), "nf4", compute_dtype="float32"), tmp_path)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=FP32_ATOL, rtol=0)
    dense = dequantize_base(quantize_base(tiny_model(arch), "nf4", compute_dtype="float32"), torch.float32)
    theirs = PeftModel.from_pretrained(dense, tmp_path)
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=FP32_ATOL, rtol=0)


def test_dora_over_nf4_base_equals_dora_over_dequantized_weight():
    ids = sample_input_ids()
    model = quantize_base(tiny_model("llama"), "nf4", compute_dtype="float32")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                             init_lora_weights=False))
    reference = dequantize_base(copy.deepcopy(model), torch.float32)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=FP32_ATOL, rtol=0)


def test_int8_base_runs_on_cpu_close_to_dense():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    layer = LoraLayer(quantize_linear(dense, "int8"))
    layer.add_adapter("default", r=4, lora_alpha=8)
    assert layer.base_layer.weight.dtype == torch.int8
    x = torch.randn(5, 128)
    with torch.no_grad():
        error = (layer(x) - dense(x)).norm() / dense(x).norm()
    assert 0 < error < 0.03, error  # LLM.int8: per-row absmax int8 weights and int8 activations
    memory = base_weight_memory(layer)
    assert memory.quantized_bytes == 128 * 64 + 64 * 4  # int8 codes + one fp32 scale per row


def test_qlora_method_quantizes_targets_when_attached():
    layer = get_method("qlora").attach(nn.Linear(32, 16), "default", LoraConfig(r=2), "q_proj")
    assert isinstance(layer, LoraLayer) and is_quantized(layer.base_layer)


@pytest.mark.slow
def test_builtin_model_base_weights_at_most_035_of_bf16(builtin_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.bfloat16)
    bf16 = base_weight_memory(model)
    quantize_base(model, "nf4")
    memory = base_weight_memory(model)
    print(f"\nSmolLM2-135M bf16: {bf16.total_bytes / 2**20:.1f} MiB; NF4: {memory.summary()}")
    assert memory.quantized_layers == 30 * 7
    assert memory.quantized_bf16_bytes + memory.dense_bf16_bytes == bf16.dense_bf16_bytes
    assert memory.quantized_ratio_to_bf16 <= 0.35  # every quantized linear weight, with its state
    # the tied embedding / output head (28% of the parameters) stays bf16, as in transformers' 4-bit loading
    assert memory.ratio_to_bf16 <= 0.45


def test_eval_forward_keeps_the_canonical_4bit_layout():
    """bitsandbytes would repack the weight for CPU inference on the first eval/no-grad call
    (breaking in_features < 64, dequantization and later training); lorakit turns that off."""
    layer = LoraLayer(quantize_linear(nn.Linear(32, 16), "nf4"))
    layer.add_adapter("default", r=2, lora_alpha=2, init_lora_weights=False)
    before = dequantize_weight(layer.base_layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 32))
    torch.testing.assert_close(dequantize_weight(layer.base_layer), before, atol=0, rtol=0)
    layer.train()
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
