"""DoRA (use_dora=True): the math, peft parity on tiny Llama and GPT-2, files both ways, merging,
and the two efficiency claims (no (out, in) temporary; activation memory close to LoRA's)."""

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
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters.dora import dora_row_norm, row_sq_norm
from lorakit.adapters.lora import LoraLayer

ARCH_NAMES = ["llama", "gpt2"]


def _config(cls, arch, **extra):
    extra.setdefault("init_lora_weights", False)
    return cls(r=4, lora_alpha=8, target_modules=ARCHS[arch][1], use_dora=True, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_magnitudes(model):
    """m != ||W + sBA|| so that the magnitude actually rescales (it equals it at init)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)


# --- the math -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_row_norm_without_materialising_equals_dense_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 80, generator=gen, dtype=torch.float64)
    A = torch.randn(6, 80, generator=gen, dtype=torch.float64) * 0.3
    B = torch.randn(48, 6, generator=gen, dtype=torch.float64) * 0.3
    expected = torch.linalg.vector_norm(W.to(dtype).double() + 1.7 * B @ A, dim=1)  # (out,)
    adapter = torch.float64 if dtype == torch.float64 else torch.float32
    got = dora_row_norm(W.to(dtype), A.to(adapter), B.to(adapter), 1.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=0, rtol=tol)
    torch.testing.assert_close(row_sq_norm(W.to(dtype)).double(), (W.to(dtype).double() ** 2).sum(1), rtol=tol, atol=0)


class _RecordShapes(TorchDispatchMode):
    """Shapes of the tensors that ops allocate (views of their inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        input_storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.shapes.add(tuple(t.shape))
        return out


def test_forward_and_backward_never_build_an_out_by_in_tensor():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(40, 24))
    layer.add_adapter("default", r=3, lora_alpha=6, init_lora_weights=False, use_dora=True)
    layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    x = torch.randn(2, 5, 40, requires_grad=True)
    layer(x).sum().backward()  # fills the ||W||² cache (computed once: W is frozen)
    with _RecordShapes() as recorder:
        layer(x).sum().backward()
    assert (24, 40) not in recorder.shapes and (40, 24) not in recorder.shapes, sorted(recorder.shapes)
    assert (24,) in recorder.shapes  # sanity: the recorder sees the layer's ops


def _saved_bytes(layer, x):
    """Bytes of distinct storages autograd keeps for backward of layer(x) followed by SiLU."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = nn.functional.silu(layer(x))
    return sum(storages.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_keeps_little_more_activation_memory_than_lora(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96, dtype=dtype, requires_grad=True)
    sizes = {}
    for use_dora in (False, True):
        layer = LoraLayer(nn.Linear(96, 160, bias=False, dtype=dtype))  # bf16 base: fp32 adapters
        layer.add_adapter("default", r=8, lora_alpha=16, use_dora=use_dora)
        layer.weight.requires_grad_(False)
        layer.eval()  # bf16 base: LoRA's fp32 product (a training step would take the bf16 mixed-precision path)
        sizes[use_dora], _ = _saved_bytes(layer, x)
    out_bytes = 4 * 64 * 160 * x.element_size()
    # DoRA saves its output, which SiLU saves anyway: only g (out,) and small extras are added
    assert sizes[True] - sizes[False] < 0.05 * out_bytes, sizes


# --- parity with peft -------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_same_weights_same_logits_and_gradients_as_peft(arch, dropout):
    """With dropout > 0 in training peft applies DoRA to the dropped input; same RNG -> same loss."""
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), _config(LoraConfig, arch, lora_dropout=dropout))
    theirs = peft_get_peft_model(tiny_model(arch), _config(PeftLoraConfig, arch, lora_dropout=dropout))
    _randomise_magnitudes(ours)
    result = set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    assert not result.unexpected_keys
    ours.train()
    theirs.train()
    torch.manual_seed(3)
    loss_ours = ours(input_ids=ids, labels=ids).loss
    torch.manual_seed(3)
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=FP32_ATOL, rtol=0)
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, param in ours.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name.replace(".default", "")], atol=FP32_ATOL, rtol=0)
            checked += "lora_magnitude_vector" in name
    assert checked > 0
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_bf16_base_matches_peft_within_bf16_rounding(arch):
    """Frozen base in bf16, adapters fp32 (peft upcasts them too): the same loss and gradients
    up to bf16 rounding (plain LoRA differs from peft by ~2% in this setting, from casts)."""
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch).to(torch.bfloat16), _config(LoraConfig, arch))
    theirs = peft_get_peft_model(tiny_model(arch).to(torch.bfloat16), _config(PeftLoraConfig, arch))
    _randomise_magnitudes(ours)
    set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    loss_ours, loss_theirs = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-2, rtol=0)
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.model.named_parameters():
        if param.requires_grad:
            reference = grads[name.replace(".default", "")]
            assert ((param.grad - reference).norm() / reference.norm()).item() < 0.02, name


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_magnitude_initialised_like_peft_and_initial_model_equals_base(arch):
    torch.manual_seed(0)
    ours = get_peft_model(tiny_model(arch), _config(LoraConfig, arch, init_lora_weights=True))
    torch.manual_seed(0)
    theirs = peft_get_peft_model(tiny_model(arch), _config(PeftLoraConfig, arch, init_lora_weights=True))
    mine = {k: v for k, v in ours.adapter_state_dict().items() if "magnitude" in k}
    from peft.utils import get_peft_model_state_dict
    peft_state = get_peft_model_state_dict(theirs)
    assert mine and set(mine) <= set(peft_state)
    for key, value in mine.items():
        torch.testing.assert_close(value, peft_state[key], atol=1e-6, rtol=0)
    ids = sample_input_ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(tiny_model(arch), ids), atol=FP32_ATOL, rtol=0)


# --- files both ways -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_lorakit_dora_file_loads_in_peft_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), _config(LoraConfig, arch))
    _randomise_magnitudes(ours)
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert theirs.peft_config["default"].use_dora
    result = set_peft_model_state_dict(theirs, tensors)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    expected = _logits(ours, ids)
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=FP32_ATOL, rtol=0)
    assert not torch.allclose(expected, _logits(tiny_model(arch), ids), atol=1e-3)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_peft_dora_file_loads_in_lorakit_with_same_logits(arch, tmp_path):
    ids = sample_input_ids()
    theirs = peft_get_peft_model(tiny_model(arch), _config(PeftLoraConfig, arch)).eval()
    _randomise_magnitudes(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(arch), tmp_path)
    assert any("lora_magnitude_vector" in n for n, _ in ours.named_parameters())
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=FP32_ATOL, rtol=0)


# --- merging ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_merge_unmerge_restores_weights_and_merged_logits_match(arch):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model(arch), _config(LoraConfig, arch))
    _randomise_magnitudes(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = _logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=FP32_ATOL, rtol=0)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)
    plain = copy.deepcopy(model).merge_and_unload()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, ids), unmerged, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("base", [nn.Linear(20, 12), "conv1d"])
def test_merge_with_several_active_adapters_matches_forward(base):
    """LoRA and DoRA adapters active together: merging them in order gives the same outputs
    (DoRA's norm is always over the unmerged base) and unmerging restores W."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = LoraLayer(Conv1D(12, 20) if base == "conv1d" else base)
    layer.add_adapter("plain", r=2, lora_alpha=4, init_lora_weights=False)
    layer.add_adapter("dora1", r=3, lora_alpha=3, init_lora_weights=False, use_dora=True)
    layer.add_adapter("dora2", r=2, lora_alpha=5, init_lora_weights=False, use_dora=True)
    _randomise_magnitudes(layer)
    layer.active_adapters = ["dora1", "plain", "dora2"]
    x = torch.randn(3, 20)
    W = layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=FP32_ATOL, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, W, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), expected, atol=FP32_ATOL, rtol=0)


def test_delete_dora_adapter_removes_magnitude():
    layer = LoraLayer(nn.Linear(8, 6))
    layer.add_adapter("a", r=2, lora_alpha=2, use_dora=True)
    layer.delete_adapter("a")
    assert "a" not in layer.lora_magnitude_vector and not list(layer.parameters())[2:]
