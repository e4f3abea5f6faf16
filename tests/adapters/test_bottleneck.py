"""Bottleneck adapters (Houlsby / Pfeiffer) on tiny random Llama, GPT-2 and Phi-3 models: the
forward against hand-written formulas, placement, training, files and their refusals.

No reference library: AdapterHub's ``adapters`` does not install next to transformers 5 and peft
has no bottleneck adapters, so the math is checked against formulas written out here."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FP32_ATOL, sample_input_ids, tiny_model

from lorakit import BottleneckConfig, LorakitError, get_peft_model, load_adapter
from lorakit.adapters import get_method
from lorakit.adapters.bottleneck import BottleneckLayer
from lorakit.config import TrainingConfig

ARCH_NAMES = ["llama", "gpt2", "phi3"]
PER_BLOCK = {"pfeiffer": 1, "houlsby": 2}
# the module-name endings each placement must wrap, per architecture
WRAPPED = {
    ("llama", "pfeiffer"): {"mlp.down_proj"}, ("llama", "houlsby"): {"self_attn.o_proj", "mlp.down_proj"},
    ("phi3", "pfeiffer"): {"mlp.down_proj"}, ("phi3", "houlsby"): {"self_attn.o_proj", "mlp.down_proj"},
    ("gpt2", "pfeiffer"): {"mlp.c_proj"}, ("gpt2", "houlsby"): {"attn.c_proj", "mlp.c_proj"},
}
# σ written out, not taken from torch.nn.functional
FORMULAS = {
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "swish": lambda z: z / (1 + torch.exp(-z)),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
}
HIDDEN = 32  # tiny_models' hidden size


def _adapted(arch: str, **config):
    torch.manual_seed(0)
    return get_peft_model(tiny_model(arch), BottleneckConfig(**{"reduction_factor": 4, **config}))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_of(layer: BottleneckLayer, h: torch.Tensor, name: str = "default") -> torch.Tensor:
    """h + W_up σ(W_down h + b_down) + b_up, by hand."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    z = h @ down.weight.T + down.bias  # (..., m)
    return h + FORMULAS[layer.non_linearity[name]](z) @ up.weight.T + up.bias  # (..., d)


@pytest.mark.parametrize("placement", list(PER_BLOCK))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_placement_wraps_the_output_projections(arch, placement):
    model = _adapted(arch, placement=placement)
    layers = dict(model.adapter_layers())
    endings = {".".join(name.split(".")[-2:]) for name in layers}
    assert endings == WRAPPED[(arch, placement)]
    assert len(layers) == PER_BLOCK[placement] * model.config.num_hidden_layers
    for layer in layers.values():  # m = hidden // reduction_factor
        assert layer.adapter_down["default"].weight.shape == (HIDDEN // 4, HIDDEN)
        assert layer.adapter_up["default"].weight.shape == (HIDDEN, HIDDEN // 4)
    assert not any(".mlp.c_fc" in n or ".c_attn" in n for n in layers)


@pytest.mark.parametrize("placement", list(PER_BLOCK))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_the_initial_adapter_is_exactly_the_identity(arch, placement):
    ids = sample_input_ids()
    model = _adapted(arch, placement=placement)
    for _, layer in model.adapter_layers():
        up = layer.adapter_up["default"]
        assert not up.weight.any() and not up.bias.any()
        assert layer.adapter_down["default"].weight.abs().sum() > 0  # W_up gets a gradient: σ(W_down h) ≠ 0
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model(arch), ids), atol=0, rtol=0)


@pytest.mark.parametrize("non_linearity", list(FORMULAS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_layer_matches_the_formula(arch, non_linearity):
    model = _adapted(arch, placement="houlsby", non_linearity=non_linearity, init_weights=False)
    for name, layer in model.adapter_layers()[:2]:  # the attention and the MLP output projection
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = _adapter_of(layer, layer.base_layer(x))
            torch.testing.assert_close(layer(x), expected, atol=FP32_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_adapted_model_is_the_base_with_the_formula_after_each_projection(arch):
    """The whole model against the unwrapped base whose output projections get the formula by a
    forward hook: checks where the adapters sit and that nothing else changes."""
    ids = sample_input_ids()
    model = _adapted(arch, placement="houlsby", non_linearity="gelu", init_weights=False)
    base = tiny_model(arch)
    for name, layer in model.adapter_layers():
        base.get_submodule(name).register_forward_hook(lambda _m, _in, out, layer=layer: _adapter_of(layer, out))
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_training_changes_only_the_adapters(arch):
    ids = sample_input_ids()
    model = _adapted(arch, placement="houlsby")
    adapter_names = {n for n, _ in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names
    assert {id(p) for p in model.trainable_tensors().values()} == \
        {id(p) for n, p in model.named_parameters() if n in adapter_names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for _ in range(2):  # W_up = 0 at init: W_down gets its first gradient in the second step
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == adapter_names
    assert losses[1] < losses[0]


@pytest.mark.parametrize("placement", list(PER_BLOCK))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_save_and_load_give_identical_logits(arch, placement, tmp_path):
    ids = sample_input_ids()
    model = _adapted(arch, placement=placement, reduction_factor=8, non_linearity="tanh", init_weights=False)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == placement
    assert saved["reduction_factor"] == 8 and saved["non_linearity"] == "tanh"
    assert saved["target_modules"] == BottleneckConfig(placement=placement).target_modules
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    modules = {f"base_model.model.{name}" for name, _ in model.adapter_layers()}
    assert keys == {f"{m}.{table}.{p}" for m in modules for table in ("adapter_down", "adapter_up")
                    for p in ("weight", "bias")}
    reloaded = load_adapter(tiny_model(arch), tmp_path)
    assert [n for n, _ in reloaded.adapter_layers()] == [n for n, _ in model.adapter_layers()]
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())  # loaded for inference
    trainable = load_adapter(tiny_model(arch), tmp_path, is_trainable=True)
    assert {id(p) for p in trainable.parameters() if p.requires_grad} == \
        {id(p) for p in trainable.trainable_tensors().values()}


def test_target_modules_replace_the_placement(tmp_path):
    ids = sample_input_ids()
    model = _adapted("llama", target_modules=["mlp.up_proj"], init_weights=False)
    layers = dict(model.adapter_layers())
    assert all(n.endswith("mlp.up_proj") for n in layers) and len(layers) == 2
    assert next(iter(layers.values())).adapter_down["default"].weight.shape == (64 // 4, 64)  # d = up_proj's out
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(load_adapter(tiny_model("llama"), tmp_path), ids), _logits(model, ids),
                               atol=0, rtol=0)


def test_merge_is_refused_in_one_line_and_unload_gives_the_base():
    ids = sample_input_ids()
    model = _adapted("llama", init_weights=False)
    adapted = _logits(model, ids)
    message = "bottleneck adapters are non-linear and cannot be merged into the weights"
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(LorakitError, match=message) as refused:
            merge()
        assert "\n" not in str(refused.value)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=0, rtol=0)  # nothing was changed
    model.unmerge_adapter()  # nothing merged: a no-op
    assert all(layer.merged_adapters == [] for _, layer in model.adapter_layers())
    base = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    torch.testing.assert_close(_logits(base, ids), _logits(tiny_model("llama"), ids), atol=0, rtol=0)


def _rewrite(directory, change):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


BAD_KEY = "base_model.model.model.layers.1.mlp.down_proj.adapter_up.weight"


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.__setitem__(BAD_KEY, torch.zeros(HIDDEN, 3)), r"has shape \(32, 3\) but the model expects \(32, 8\)"),
    (lambda t: t[BAD_KEY].__setitem__((0, 1), float("nan")), "holds non-finite values"),
    (lambda t: t.pop(BAD_KEY), "is missing"),
    (lambda t: t.__setitem__(BAD_KEY.replace("layers.1", "layers.7"), torch.zeros(HIDDEN, 8)),
     "does not match any adapter parameter"),
])
def test_bad_files_are_refused_naming_the_tensor(tmp_path, change, expected):
    _adapted("llama").save_pretrained(tmp_path)
    _rewrite(tmp_path, change)
    base = tiny_model("llama")
    with pytest.raises(LorakitError, match=expected) as refused:
        load_adapter(base, tmp_path)
    assert "layers." in str(refused.value) and ".adapter_up.weight" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())  # the base is given back unwrapped


def test_a_config_that_builds_other_layers_is_refused(tmp_path):
    """The config rebuilds the layers: a reduction factor the weights were not made with is caught."""
    _adapted("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "reduction_factor": 8}))
    mismatch = r"adapter_down\.(weight|bias)' has shape \(8,.*\) but the model expects \(4,"
    with pytest.raises(LorakitError, match=mismatch):
        load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("kwargs, expected", [
    ({"placement": "pfeifer"},
     r"placement 'pfeifer' is unknown \(did you mean 'pfeiffer'\?\); valid choices: pfeiffer, houlsby"),
    ({"reduction_factor": 0}, "reduction_factor must be a positive number"),
    ({"non_linearity": "sigmoid"}, "non_linearity 'sigmoid' is unknown"),
    ({"adapter_dropout": 1.0}, r"adapter_dropout must be in \[0, 1\)"),
    ({"bias": "all"}, "bias must be 'none'"),
    ({"init_weights": "gaussian"}, "init_weights must be true or false"),
    ({"reduction": 4}, "unknown key 'reduction'"),
])
def test_bad_config_values_are_one_line_errors(kwargs, expected):
    with pytest.raises(LorakitError, match=expected) as refused:
        BottleneckConfig(**kwargs)
    assert "\n" not in str(refused.value)


def test_a_target_that_is_not_a_linear_layer_is_refused():
    with pytest.raises(LorakitError, match="target module 'model.layers.0.mlp' is a LlamaMLP"):
        get_peft_model(tiny_model("llama"), BottleneckConfig(target_modules=["mlp"]))


def test_adapters_stay_fp32_over_a_bf16_base():
    ids = sample_input_ids()
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), BottleneckConfig(placement="houlsby"))
    assert {p.dtype for p in model.trainable_tensors().values()} == {torch.float32}
    logits = _logits(model, ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, _logits(tiny_model("llama").to(torch.bfloat16), ids), atol=0, rtol=0)


def test_two_adapters_switch_disable_and_delete():
    ids = sample_input_ids()
    base = _logits(tiny_model("gpt2"), ids)
    model = _adapted("gpt2", init_weights=False)
    first = _logits(model, ids)
    model.add_adapter("second", BottleneckConfig(placement="houlsby", init_weights=False))
    assert model.active_adapter == "second"
    second = _logits(model, ids)
    assert not torch.allclose(second, first, atol=1e-4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".second." in n}
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, ids), first, atol=0, rtol=0)
    model.delete_adapter("second")
    assert not any(layer.has_adapter("second") for _, layer in model.adapter_layers())
    torch.testing.assert_close(_logits(model, ids), first, atol=0, rtol=0)


def test_training_config_method_adapter():
    config = TrainingConfig.from_dict({"method": "adapter", "lora": {"placement": "houlsby", "reduction_factor": 8}})
    assert isinstance(config.lora, BottleneckConfig) and get_method("adapter").config_class is BottleneckConfig
    again = TrainingConfig.from_dict(config.to_dict())
    assert again.lora == config.lora


def test_serving_several_adapters_uses_them_one_at_a_time(tmp_path):
    """The multi-adapter model loads bottleneck adapters and switches between them; per-row mixed
    batches are LoRA-only and refuse them in one line."""
    from lorakit.inference.multi_adapter import MultiAdapterModel

    ids = sample_input_ids()
    model = _adapted("gpt2", init_weights=False)
    model.save_pretrained(tmp_path)
    multi = MultiAdapterModel(tiny_model("gpt2"), check_base=False)
    multi.add_adapter("bn", tmp_path)
    multi.set_adapter("bn")
    torch.testing.assert_close(_logits(multi, ids), _logits(model, ids), atol=0, rtol=0)
    multi.set_adapter(None)
    torch.testing.assert_close(_logits(multi, ids), _logits(tiny_model("gpt2"), ids), atol=0, rtol=0)
    with pytest.raises(LorakitError, match="adapter 'bn' is BOTTLENECK; mixed-adapter batches serve LoRA-family and AdaLoRA adapters"):
        multi(input_ids=ids, adapter_names=["bn", None])
