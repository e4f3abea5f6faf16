"""Model loading: local directories, the built-in GGUF model, the conversion cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import sample_input_ids, tiny_model

from lorakit.models import load as load_module
from lorakit.models.load import builtin_gguf_path, gguf_to_transformers_dir, load_model


def test_local_directory_loads_with_tokenizer_and_pad_token(tmp_path, builtin_model_dir):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(builtin_model_dir / name, tmp_path / name)
    loaded, tokenizer = load_model(str(tmp_path))
    assert tokenizer.pad_token is not None and not loaded.training
    ids = sample_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    bf16, _ = load_model(str(tmp_path), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_builtin_model_answers_paris_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert model.name_or_path == "smollm2-135m-instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_corrupt_cache_entry_is_detected_and_rebuilt(tmp_path, monkeypatch, builtin_model_dir):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    gguf = builtin_gguf_path("smollm2-135m-instruct")
    entry = load_module._gguf_cache_entry(gguf)
    shutil.copytree(builtin_model_dir, entry)  # a valid entry, as a previous run left it
    assert gguf_to_transformers_dir(gguf) == entry and load_module._cache_entry_valid(entry)
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as handle:  # a partial write: the file is cut short
        handle.truncate(weights.stat().st_size // 2)
    assert not load_module._cache_entry_valid(entry)
    assert gguf_to_transformers_dir(gguf) == entry
    assert load_module._cache_entry_valid(entry)
    assert weights.stat().st_size == (builtin_model_dir / "model.safetensors").stat().st_size
    (entry / "lorakit_cache.json").unlink()  # a conversion that died before finishing
    assert not load_module._cache_entry_valid(entry)


@pytest.mark.slow
def test_gguf_file_path_loads_through_the_cache():
    gguf = builtin_gguf_path("smollm2-135m-instruct")
    model, tokenizer = load_model(str(gguf))
    assert model.name_or_path == str(gguf)  # recorded as base_model_name_or_path in adapters
    assert tokenizer.chat_template and model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None  # dequantized, a plain model
