"""Bad input gives one clear line (LorakitError), never a traceback from deep inside."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from lorakit import LoraConfig, LorakitError, get_peft_model, load_adapter
from lorakit.adapters.lora.config import LoraConfig as _Cfg
from lorakit.models.load import load_model


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def _saved_adapter(tmp_path, arch="llama", targets=("q_proj", "v_proj")):
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, target_modules=list(targets)))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_corrupt_safetensors_names_the_file(tmp_path):
    directory = _saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), directory)
    assert "adapter_model.safetensors" in _one_line(excinfo) and "not a valid safetensors" in str(excinfo.value)


def test_truncated_safetensors_is_rejected(tmp_path):
    directory = _saved_adapter(tmp_path)
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), directory)
    assert "adapter_model.safetensors" in _one_line(excinfo)


def test_adapter_for_another_architecture(tmp_path):
    directory = _saved_adapter(tmp_path, arch="gpt2", targets=("c_attn",))
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), directory)
    message = _one_line(excinfo)
    assert "c_attn" in message and "q_proj" in message  # what was asked, and what exists


def test_adapter_with_wrong_shapes_names_the_first_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = _saved_adapter(tmp_path, arch="llama")  # hidden size 32
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(wider, directory)
    message = _one_line(excinfo)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message and "shape" in message
    assert not any("lora_" in name for name, _ in wider.named_parameters())  # nothing half-loaded left behind


def test_missing_adapter_config(tmp_path):
    directory = _saved_adapter(tmp_path)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), directory)
    assert "adapter_config.json is missing" in _one_line(excinfo)


def test_missing_directory(tmp_path):
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), tmp_path / "nope")
    assert "does not exist" in _one_line(excinfo)


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(LorakitError) as excinfo:
        LoraConfig(r=8, lora_alpah=16)
    assert "lora_alpah" in _one_line(excinfo) and "did you mean 'lora_alpha'" in str(excinfo.value)
    with pytest.raises(LorakitError) as excinfo:
        _Cfg.from_dict({"r": 4, "target_module": ["q_proj"]})
    assert "did you mean 'target_modules'" in _one_line(excinfo)


def test_peft_feature_lorakit_lacks_is_refused_not_ignored():
    with pytest.raises(LorakitError) as excinfo:
        _Cfg.from_dict({"r": 4, "peft_type": "LORA", "layer_replication": [[0, 1]]})
    assert "layer_replication" in _one_line(excinfo)
    assert _Cfg.from_dict({"r": 4, "peft_type": "LORA", "layer_replication": None, "peft_version": "0.21"}).r == 4


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(bias="some"), dict(init_lora_weights="olora_x"),
                                 dict(lora_dropout=1.5)])
def test_invalid_values(bad):
    with pytest.raises(LorakitError) as excinfo:
        LoraConfig(**bad)
    assert _one_line(excinfo)


def test_target_modules_matching_nothing_lists_existing_layers():
    with pytest.raises(LorakitError) as excinfo:
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["query", "value"]))
    message = _one_line(excinfo)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_layers_to_transform_out_of_range_names_the_real_cause():
    """Issue 14: [99] on a 2-layer model used to say that target_modules matched nothing."""
    with pytest.raises(LorakitError) as excinfo:
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[99]))
    message = _one_line(excinfo)
    assert message.startswith("layers_to_transform [99] selects no layer") and "layers 0 to 1" in message


def test_missing_hub_model_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorakitError) as excinfo:
        load_model("lorakit-tests/no-such-model")
    message = _one_line(excinfo)
    assert "not available" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_path(tmp_path):
    with pytest.raises(LorakitError) as excinfo:
        load_model(str(tmp_path / "missing.gguf"))
    assert "does not exist" in _one_line(excinfo)
