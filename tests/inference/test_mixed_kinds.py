"""Every adapter kind lorakit trains with low-rank layers in one mixed batch: LoRA, rsLoRA,
PiSSA (as saved: converted to plain LoRA of rank 2r), AdaLoRA (pruned ranks), DoRA and
modules_to_save. Each row's logits equal that adapter alone (fp32, FP32_ATOL), tiny Llama and GPT-2."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, FP32_ATOL, sample_input_ids, tiny_model

from lorakit import AdaLoraConfig, LoraConfig, get_peft_model
from lorakit.inference import MultiAdapterModel
from lorakit.inference import mixed as mixed_module

ADALORA_TARGETS = {"llama": ["o_proj"], "gpt2": ["c_proj"]}  # a LoRA and an AdaLoRA layer cannot share a module


def _perturb(params, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.mul_(1 + scale * torch.randn(param.shape, generator=generator))


def _lora(arch, name, root, seed, **kwargs):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(arch), LoraConfig(target_modules=ARCHS[arch][1], **kwargs), name)
    return model


def _save_kinds(arch, root) -> dict:
    """name -> directory of one adapter of each kind, all with non-trivial (random) weights."""
    models = {
        "lora": _lora(arch, "lora", root, 1, r=2, lora_alpha=4, init_lora_weights=False),
        "rslora": _lora(arch, "rslora", root, 2, r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False),
        "dora": _lora(arch, "dora", root, 3, r=3, lora_alpha=6, use_dora=True, init_lora_weights=False),
        "pissa": _lora(arch, "pissa", root, 4, r=2, lora_alpha=2, init_lora_weights="pissa"),
        "mts": _lora(arch, "mts", root, 5, r=2, lora_alpha=4, init_lora_weights=False, modules_to_save=["lm_head"]),
    }
    for _, layer in models["dora"].adapter_layers():  # g = m / ||W + sBA|| != 1 (at init it is 1)
        _perturb([layer.lora_magnitude_vector["dora"].weight], 30)
    for _, layer in models["pissa"].adapter_layers():  # PiSSA starts equal to the base: train it a little
        _perturb([layer.lora_A["pissa"].weight, layer.lora_B["pissa"].weight], 40)
    _perturb([w.modules_to_save["mts"].weight for w in models["mts"]._wrappers()], 50)
    torch.manual_seed(6)
    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, init_lora_weights=False,
                           target_modules=ADALORA_TARGETS[arch])
    ada = get_peft_model(tiny_model(arch), config, "ada")
    pattern = {}
    for i, (module_name, layer) in enumerate(ada.adapter_layers()):
        kept = [True, i % 2 == 0, False, True][: layer.r["ada"]]  # different kept ranks per layer
        with torch.no_grad():
            layer.lora_E["ada"][~torch.tensor(kept)] = 0
        pattern[f"{module_name}.lora_E"] = kept
    ada.peft_config["ada"].rank_pattern = pattern
    models["ada"] = ada
    dirs = {}
    for name, model in models.items():
        model.save_pretrained(root / name, selected_adapters=[name])
        dirs[name] = root / name / name if (root / name / name).is_dir() else root / name
    return dirs


def mixed_kinds_model(arch: str, root) -> MultiAdapterModel:
    """A tiny ``arch`` model with every adapter kind of ``_save_kinds`` loaded."""
    multi = MultiAdapterModel(tiny_model(arch))
    for name, directory in _save_kinds(arch, root).items():
        multi.add_adapter(name, directory)
    return multi


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def multi(request, tmp_path_factory):
    return mixed_kinds_model(request.param, tmp_path_factory.mktemp(request.param))


ROWS = ["dora", "lora", "mts", None, "ada", "rslora", "pissa", "dora", "mts"]


def _alone(multi, ids, name):
    multi.set_adapter(name)
    try:
        with torch.no_grad():
            return multi(input_ids=ids).logits
    finally:
        multi.set_adapter(None)


def test_every_kind_in_one_batch_equals_each_alone(multi):
    ids = sample_input_ids(batch=len(ROWS), length=9, seed=7)
    with torch.no_grad():
        mixed = multi(input_ids=ids, adapter_names=ROWS).logits
    base = _alone(multi, ids, None)
    for b, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[b:b + 1], _alone(multi, ids[b:b + 1], name), atol=FP32_ATOL, rtol=0)
        if name is not None:  # each adapter really changes the answer
            assert (mixed[b] - base[b]).abs().max() > 1e-3, name
    layers = dict(multi.lora.adapter_layers())
    ranks = {layer.r["ada"] for layer in layers.values() if "ada" in layer.r}
    assert len(ranks) > 1  # AdaLoRA's pruned ranks differ per layer
    assert max(layer.r["pissa"] for layer in layers.values() if "pissa" in layer.r) == 4  # converted: 2r


def test_dora_scale_is_computed_once_per_adapter_set_not_per_step(multi, monkeypatch):
    calls = []
    original = mixed_module.weight_norm
    monkeypatch.setattr(mixed_module, "weight_norm", lambda layer, name: calls.append(name) or original(layer, name))
    multi.delete_adapter("lora")  # the stacks are rebuilt once, at the next mixed batch
    ids = sample_input_ids(batch=3, length=5, seed=8)
    with torch.no_grad():
        first = multi(input_ids=ids, adapter_names=["dora", "mts", "dora"]).logits
        built = len(calls)
        again = multi(input_ids=ids, adapter_names=["dora", "mts", "dora"]).logits
    assert built == sum(1 for _, layer in multi.lora.adapter_layers() if "dora" in getattr(layer, "r", {}))
    assert len(calls) == built and torch.equal(first, again)
    torch.testing.assert_close(first[:1], _alone(multi, ids[:1], "dora"), atol=FP32_ATOL, rtol=0)


def test_batched_generation_with_dora_and_modules_to_save_rows_equals_each_alone(multi):
    ids = sample_input_ids(batch=4, length=5, seed=9)
    names = ["dora", "mts", None, "ada"]
    out = multi.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                         max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    for b, name in enumerate(names):
        multi.set_adapter(name)
        alone = multi.generate(input_ids=ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]),
                               max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        multi.set_adapter(None)
        assert torch.equal(out[b], alone[0]), name


@pytest.mark.parametrize("rows", [["dora"] * 8, ["dora"] * 8 + [None] + ["rslora"] * 8,
                                  ["ada"] * 8 + ["mts"] * 8 + [None] * 4])
def test_rows_sharing_few_adapters_side_by_side_equal_each_alone(multi, rows):
    """Many rows over few adapters take the side-by-side form (each adapter read once per step,
    rows masked to their own block); the test above, with few rows per adapter, the per-row form."""
    assert len({r for r in rows if r}) * mixed_module._SIDE_BY_SIDE_MIN_ROWS_PER_ADAPTER <= len(rows)
    ids = sample_input_ids(batch=len(rows), length=5, seed=3)
    with torch.no_grad():
        mixed = multi(input_ids=ids, adapter_names=rows).logits
    for b, name in enumerate(rows):
        torch.testing.assert_close(mixed[b:b + 1], _alone(multi, ids[b:b + 1], name), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("rows", [["dora", "dora", "rslora", "rslora", "rslora", None, "ada", "mts", "mts"],
                                  [None, None, "pissa", "pissa"]])
def test_rows_grouped_by_adapter_equal_each_alone(multi, rows, monkeypatch):
    """Few rows per adapter but some adapters on several rows take the grouped form (each slot's
    rows side by side in a grid, every adapter read once, padding places never read)."""
    made = []
    groups = mixed_module._groups
    monkeypatch.setattr(mixed_module, "_groups", lambda ids, slots: made.append(len(slots)) or groups(ids, slots))
    ids = sample_input_ids(batch=len(rows), length=5, seed=4)
    with torch.no_grad():
        mixed = multi(input_ids=ids, adapter_names=rows).logits
    assert made and max(made) < len(rows)
    for b, name in enumerate(rows):
        torch.testing.assert_close(mixed[b:b + 1], _alone(multi, ids[b:b + 1], name), atol=FP32_ATOL, rtol=0)
