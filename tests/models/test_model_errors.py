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


# --- found by the adapter fuzzer (tests/fuzz/test_fuzz_adapter.py) ---------------------------

def test_refused_adapter_gives_back_the_model_with_its_requires_grad(tmp_path):
    """A refusal unwrapped the model but left every parameter frozen (loading freezes the base)."""
    directory = _saved_adapter(tmp_path, arch="gpt2", targets=("c_attn",))
    base = tiny_model("llama")
    base.model.embed_tokens.weight.requires_grad_(False)  # one frozen on purpose: it stays frozen
    before = {name: p.requires_grad for name, p in base.named_parameters()}
    with pytest.raises(LorakitError):
        load_adapter(base, directory)
    assert {name: p.requires_grad for name, p in base.named_parameters()} == before


@pytest.mark.parametrize("bad, fragment", [
    (dict(target_modules=[1]), "target_modules must be a list of module names or a regex"),
    (dict(target_modules="q_proj(?P<"), "target_modules 'q_proj(?P<' is not a valid regular expression"),
    (dict(exclude_modules={"q_proj": 1}), "exclude_modules must be a list of module names or a regex"),
    (dict(layers_to_transform="0"), "layers_to_transform must be a list of layer indices"),
    (dict(layers_to_transform=[0, -1]), "layers_to_transform must be a list of layer indices"),
    (dict(layers_to_transform=[0], layers_pattern=3), "layers_pattern must be a name or a list of names"),
    (dict(layers_to_transform=[0], layers_pattern="layers)"), "layers_pattern 'layers)' is not a valid regular"),
    (dict(modules_to_save=[{}]), "modules_to_save must be a list of module names"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list of module names"),
    (dict(rank_pattern={"q_proj[": 2}), "key 'q_proj[' is not a valid regular expression"),
    (dict(alpha_pattern={"v_proj)": 2.0}), "key 'v_proj)' is not a valid regular expression"),
])
def test_module_selection_of_the_wrong_type_is_refused_by_the_config(bad, fragment):
    """These reached the module matching and raised TypeError or re.error from deep inside it."""
    with pytest.raises(LorakitError) as excinfo:
        LoraConfig(**{"target_modules": ["q_proj"], **bad})
    assert fragment in _one_line(excinfo)
    with pytest.raises(LorakitError) as excinfo:
        load_adapter(tiny_model("llama"), _adapter_with_config(bad))
    assert fragment in _one_line(excinfo)


def _adapter_with_config(changes: dict):
    import json
    import tempfile
    from pathlib import Path

    directory = _saved_adapter(Path(tempfile.mkdtemp()))
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))
    return directory


def test_trainable_modules_regex_that_does_not_compile_is_refused():
    from lorakit.adapters import FullConfig

    with pytest.raises(LorakitError) as excinfo:
        FullConfig(trainable_modules="mlp.(")
    assert "is not a valid regular expression" in _one_line(excinfo)


def test_broken_full_fine_tuning_directory_is_refused(tmp_path):
    """A directory with a config.json (lorakit's full fine-tuning output) but no model in it
    raised transformers' ValueError / OSError."""
    for text in ("{}", "{"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(LorakitError) as excinfo:
            load_adapter(tiny_model("llama"), tmp_path)
        assert "is not a loadable fine-tuned model directory" in _one_line(excinfo)


def test_prompt_baseline_with_a_broken_context_is_refused(tmp_path):
    """A context that is not a list of messages raised TypeError in PromptModel."""
    import json

    for context in (3, [1], [{"role": "user"}]):
        (tmp_path / "prompt_baseline.json").write_text(json.dumps({"num_examples": 1, "seed": 0, "context": context}))
        with pytest.raises(LorakitError) as excinfo:
            load_adapter(tiny_model("llama"), tmp_path)
        assert "'context' must be a list of" in _one_line(excinfo)


def test_adapter_config_that_is_not_utf8_is_refused(tmp_path):
    from lorakit.models.peft_format import read_adapter_config_dict

    directory = _saved_adapter(tmp_path)
    (directory / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": "\xff"}')
    with pytest.raises(LorakitError) as excinfo:
        read_adapter_config_dict(directory)  # what merge reads first: UnicodeDecodeError
    assert "not UTF-8 text" in _one_line(excinfo)


# --- found by the GGUF fuzzer (tests/fuzz/test_fuzz_gguf.py) ----------------------------------

@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _refused_gguf(path, gguf_cache) -> str:
    with pytest.raises(LorakitError) as excinfo:
        load_model(str(path))
    entries = gguf_cache / "gguf"
    assert not entries.exists() or not any(entries.iterdir())  # nothing half-written in the cache
    return _one_line(excinfo)


def test_tiny_gguf_loads(tmp_path, gguf_cache):
    from tiny_gguf import write_gguf

    model, tokenizer = load_model(str(write_gguf(tmp_path / "tiny.gguf")))
    assert model.config.num_hidden_layers == 1 and tokenizer("hello world")["input_ids"]


def test_gguf_promising_more_blocks_than_it_holds_is_refused_at_once(tmp_path, gguf_cache):
    """block_count 2**20 made transformers build a million decoder blocks before reading a
    tensor: minutes of work (and gigabytes) to end in a shape error."""
    import time

    from tiny_gguf import write_gguf

    start = time.perf_counter()
    message = _refused_gguf(write_gguf(tmp_path / "m.gguf", block_count=2**20), gguf_cache)
    assert "promises 1048576 blocks but it holds tensors of 1" in message
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("drop, key", [("token_embd.weight", "model.embed_tokens.weight"),
                                       ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight")])
def test_gguf_missing_a_tensor_is_refused(tmp_path, gguf_cache, drop, key):
    """transformers filled a missing tensor with random values and the model loaded."""
    from tiny_gguf import write_gguf

    message = _refused_gguf(write_gguf(tmp_path / "m.gguf", drop=frozenset({drop})), gguf_cache)
    assert f"holds no tensor for '{key}'" in message


def test_gguf_whose_metadata_does_not_fit_its_weights_is_refused(tmp_path, gguf_cache):
    """3 key/value heads for 2 attention heads: the weights load, the first forward pass failed."""
    from tiny_gguf import write_gguf

    message = _refused_gguf(write_gguf(tmp_path / "m.gguf", kv_heads=3), gguf_cache)
    assert "metadata does not fit its weights, a forward pass fails" in message


@pytest.mark.parametrize("kind", ["array_count", "string_length", "kv_count", "n_dims"])
def test_gguf_header_count_past_the_end_of_the_file_is_refused(tmp_path, gguf_cache, kind):
    """One lying header integer (the vocabulary's length 277 -> 2**31) made the gguf reader
    build Python objects until memory ran out (minutes, then the OOM killer or a SystemError).
    The header is now walked first: that lie and the others here are refused before the reader."""
    import struct

    from tiny_gguf import write_gguf

    raw = bytearray(write_gguf(tmp_path / "valid.gguf").read_bytes())
    offset, width, lie = {"array_count": (None, 8, 2**31), "string_length": (24, 8, 2**40),
                          "kv_count": (16, 8, 2**32), "n_dims": (None, 4, 9)}[kind]
    if kind == "array_count":  # tokenizer.ggml.tokens: key, type 9 (array), item type 8, then the count
        offset = raw.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
    if kind == "n_dims":  # after the first tensor name
        offset = raw.index(b"token_embd.weight") + len(b"token_embd.weight")
    struct.pack_into("<Q" if width == 8 else "<I", raw, offset, lie)
    (tmp_path / "lie.gguf").write_bytes(bytes(raw))
    message = _refused_gguf(tmp_path / "lie.gguf", gguf_cache)
    assert "not a valid GGUF file" in message and "damaged or truncated" in message
