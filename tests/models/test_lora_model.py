"""LoraModel behaviour: peft's API surface, config options against real peft, files, export."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel
from peft import get_peft_model as peft_get_peft_model
from safetensors.torch import load_file
from tiny_models import sample_input_ids, tiny_model
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_seed_snippet_runs_with_only_the_import_changed(tmp_path):
    model = tiny_model("llama")
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    model = get_peft_model(model, config)
    line = model.print_trainable_parameters()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8 and saved["lora_alpha"] == 32
    assert saved["task_type"] == "CAUSAL_LM"
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert line.startswith("trainable params: ")


def test_trainable_parameter_report_matches_peft(capsys):
    config = dict(r=4, target_modules="all-linear")
    ours = get_peft_model(tiny_model("qwen2"), LoraConfig(**config))
    theirs = peft_get_peft_model(tiny_model("qwen2"), PeftLoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    ours_line = capsys.readouterr().out.strip()
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out.strip()


PEFT_OPTION_CASES = {
    "all-linear": ("llama", dict(target_modules="all-linear")),
    "regex": ("llama", dict(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj")),
    "exclude": ("mistral", dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])),
    "layers_to_transform": ("qwen2", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1])),
    "rank_alpha_pattern": ("llama", dict(target_modules="all-linear", rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
                                         alpha_pattern={"q_proj": 3})),
    "rslora": ("gemma", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "bias_lora_only": ("gpt2", dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "phi3_all_linear": ("phi3", dict(target_modules="all-linear")),
}


@pytest.mark.parametrize("case", list(PEFT_OPTION_CASES))
def test_peft_options_match_peft_both_ways(case, tmp_path):
    arch, options = PEFT_OPTION_CASES[case]
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))
    theirs = peft_get_peft_model(tiny_model(arch), PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))
    ours_keys = set(ours.adapter_state_dict())
    theirs.save_pretrained(tmp_path / "peft")
    assert ours_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    with torch.no_grad():  # make trainable biases / saved modules differ from the base, too
        for param in ours.adapter_state_dict().values():
            param.add_(0.01 * torch.randn_like(param))
    ours.save_pretrained(tmp_path / "ours")
    peft_loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(peft_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    ours_loaded = load_adapter(tiny_model(arch), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours_loaded, ids), _logits(theirs.eval(), ids), atol=FP32_ATOL, rtol=0)


def test_all_linear_excludes_output_head_and_gaussian_init_matches_peft():
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    names = [n for n, _ in ours.adapter_layers()]
    assert "lm_head" not in names and len(names) == 2 * 7
    std = ours.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.std().item()
    assert abs(std - 1 / 4) < 0.05  # peft: A ~ N(0, 1/r)


def test_save_load_round_trip_is_exact_and_writes_no_temp_files(tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(tiny_model("gpt2"), tmp_path)
    for key, tensor in ours.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], tensor)
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = load_adapter(tiny_model("gpt2"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == sum(t.numel() for t in ours.adapter_state_dict().values())


def test_legacy_bin_adapter_loads_with_weights_only(tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")
    loaded = load_adapter(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ours, ids), atol=0, rtol=0)


def test_eval_never_merges_and_dropout_only_in_train_mode():
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                                                          init_lora_weights=False))
    ours.eval()
    assert all(not layer.merged_adapters for _, layer in ours.adapter_layers())
    ids = sample_input_ids()
    assert torch.equal(_logits(ours, ids), _logits(ours, ids))
    ours.train()
    assert not torch.equal(_logits(ours, ids), _logits(ours, ids))


def test_merged_export_loads_in_transformers_with_adapter_logits(tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = _logits(ours, ids)
    ours.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=FP32_ATOL, rtol=0)


def test_two_adapters_side_by_side_switch_and_delete(tmp_path):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    first = _logits(model, ids)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    second = _logits(model, ids)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), first)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_config.json").is_file()  # peft: non-default adapters in subfolders
    model.delete_adapter("other")
    assert torch.equal(_logits(model, ids), first)


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|v_proj)", ["q_proj", "v_proj"]])
def test_second_adapter_targets_wrappers_not_their_insides(targets):
    ids = sample_input_ids()
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    layers_before = [n for n, _ in model.adapter_layers()]
    model.add_adapter("second", LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    assert [n for n, _ in model.adapter_layers()] == layers_before
    reference = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=targets))
    with torch.no_grad():
        for key, param in reference.adapter_state_dict().items():
            param.copy_(model.adapter_state_dict("second")[key])
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-5, rtol=0)


def test_all_linear_with_layers_to_transform_saves_names_peft_accepts(tmp_path):
    ids = sample_input_ids()
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", layers_to_transform=1,
                                                          init_lora_weights=False))
    assert {n.split(".")[2] for n, _ in ours.adapter_layers()} == {"1"}
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft_loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_loaded, ids), _logits(ours, ids), atol=FP32_ATOL, rtol=0)
    with pytest.raises(LorakitError):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[1])
