"""The fused LoRA linear (one autograd node, low-rank term accumulated by addmm) equals the
plain composition of linears, in value and in the gradients of x, A and B; LoraLayer takes it
only in the plain case (one adapter, no dropout, no DoRA, a frozen Linear in the adapter's dtype)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.lora.functional import lora_linear
from tiny_models import FP32_ATOL


def _reference(x, weight, bias, A, B, s):
    return nn.functional.linear(x, weight, bias) + s * nn.functional.linear(nn.functional.linear(x, A), B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_equals_reference_value_and_gradients(dtype, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g, dtype=dtype, requires_grad=True)   # (B, T, in)
    weight = torch.randn(40, 24, generator=g, dtype=dtype)
    bias = torch.randn(40, generator=g, dtype=dtype) if with_bias else None
    A = torch.randn(6, 24, generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(40, 6, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 5, 40, generator=g, dtype=dtype)
    ours = lora_linear(x, weight, bias, A, B, 0.75)
    (ours * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    reference = _reference(x, weight, bias, A, B, 0.75)
    (reference * upstream).sum().backward()
    atol = FP32_ATOL if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, reference, atol=atol, rtol=1e-5)
    for mine, theirs in zip(grads, (x.grad, A.grad, B.grad)):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=1e-5)


def _layer(dropout=0.0, dora=False, dtype=torch.float32):
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(24, 40, dtype=dtype).requires_grad_(False))
    layer.add_adapter("default", r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, use_dora=dora)
    return layer


def _calls(layer, x):
    """Output of the layer and whether the fused node produced it."""
    y = layer(x)
    node, names = y.grad_fn, []
    while node is not None and len(names) < 3:  # the output is a view of the node's (N, out) result
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    return y, any(name.startswith("_LoraLinear") for name in names)


def test_layer_uses_the_fused_path_only_in_the_plain_case():
    x = torch.randn(2, 7, 24, requires_grad=True)
    y, fused = _calls(_layer(), x)
    assert fused
    manual = _layer()
    reference = manual.base_layer(x) + manual.adapter_output("default", x)
    torch.testing.assert_close(y, reference, atol=FP32_ATOL, rtol=1e-5)
    assert not _calls(_layer(dropout=0.1).train(), x)[1]      # dropout: the general path
    assert not _calls(_layer(dora=True), x)[1]                # DoRA: its own strategy
    assert not _calls(_layer(dtype=torch.bfloat16).eval(), x.to(torch.bfloat16))[1]  # fp32 adapters over bf16: eval
    assert _calls(_layer(dtype=torch.bfloat16).train(), x.to(torch.bfloat16))[1]  # ... a training step: mixed
    trainable = _layer()
    trainable.base_layer.weight.requires_grad_(True)          # a trained base needs its weight gradient
    assert not _calls(trainable, x)[1]
    disabled = _layer()
    disabled.disable_adapters = True
    torch.testing.assert_close(disabled(x), disabled.base_layer(x))


def test_mixed_precision_step_over_bf16_base_keeps_fp32_master_gradients():
    """bf16 base, fp32 adapters, training: the fused product runs in bf16 and the adapter
    gradients come back in fp32, close to the fp32 computation at bf16's precision."""
    layer = _layer(dtype=torch.bfloat16).train()
    x = torch.randn(4, 9, 24, generator=torch.Generator().manual_seed(3))
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    grads = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    W = layer.base_layer.weight.float()
    reference = _reference(x.to(torch.bfloat16).float(), W, layer.base_layer.bias.float(), A, B, layer.scaling["default"])
    reference.square().sum().backward()
    for mine, theirs in zip(grads, (A.grad, B.grad)):
        assert (mine - theirs).norm() <= 0.02 * theirs.norm()  # bf16 rounding, not a different gradient


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_path_over_a_4bit_base_equals_the_unfused_layer(with_bias):
    """QLoRA: one plain adapter over a Linear4bit computing in x's dtype (fp32) takes the fused
    node (the base dequantized in forward and again in backward); value and the gradients of x,
    A and B equal the unfused composition (bitsandbytes' 4-bit matmul + the adapter's linears).
    A bf16-computing 4-bit base under fp32 activations keeps the unfused path."""
    from lorakit.adapters.qlora.base import quantize_linear

    def layer(compute):
        torch.manual_seed(0)
        base = quantize_linear(nn.Linear(64, 96, bias=with_bias), "nf4", compute, True)
        wrapped = LoraLayer(base)
        wrapped.add_adapter("default", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
        return wrapped.train()

    fused_layer, plain_layer = layer(torch.float32), layer(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, 96, generator=g)
    y, fused = _calls(fused_layer, x)
    assert fused
    (y * upstream).sum().backward()
    ours = [x.grad.clone()] + [p.grad for p in (fused_layer.lora_A["default"].weight, fused_layer.lora_B["default"].weight)]
    x.grad = None
    reference = plain_layer.base_layer(x) + plain_layer.adapter_output("default", x)
    (reference * upstream).sum().backward()
    theirs = [x.grad, plain_layer.lora_A["default"].weight.grad, plain_layer.lora_B["default"].weight.grad]
    torch.testing.assert_close(y, reference, atol=FP32_ATOL, rtol=1e-5)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, atol=FP32_ATOL, rtol=1e-5)
    assert not _calls(layer(torch.bfloat16), x)[1]
