"""QLoRA's streaming load (``lorakit.models.stream_load``) makes exactly the model that a dense
load followed by ``quantize_base`` makes: every quantized weight, every dense tensor, the logits
and the base fingerprint equal, for tied and untied heads, biased layers (Qwen2), sharded
checkpoints, NF4 with and without quantized embeddings, and int8."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lorakit._fingerprint import base_record
from lorakit._quantized import dequantize_weight, is_quantized
from lorakit.adapters import QLoraConfig
from lorakit.adapters.qlora.base import quantize_base
from lorakit.models.load import load_model

# hidden 64: bitsandbytes' 4-bit CPU path needs in_features >= 64
_SHAPES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _save(directory, arch: str, tied: bool, smol_tokenizer):
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_SHAPES, tie_word_embeddings=tied))
    else:
        model = LlamaForCausalLM(LlamaConfig(**_SHAPES, tie_word_embeddings=tied))
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="100KB")  # several shards, bf16 like the hub
    smol_tokenizer.save_pretrained(directory)
    return directory


def _quantized_and_dense(model) -> dict[str, torch.Tensor]:
    """Every weight as the model computes with it: quantized layers dequantized, the rest as held."""
    found = {}
    for name, module in model.named_modules():
        if is_quantized(module):
            found[name + ".weight"] = dequantize_weight(module, torch.float32)
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if name.endswith("weight") and owner + ".weight" in found:
            continue
        if tensor.is_floating_point():
            found.setdefault(name, tensor)
    return found


@pytest.mark.parametrize("arch,tied,quantization,embeddings", [
    ("llama", True, "nf4", None), ("llama", False, "nf4", None), ("llama", False, "nf4", False),
    ("qwen2", True, "nf4", None), ("llama", True, "int8", None), ("llama", False, "fp4", True)])
def test_streaming_load_equals_dense_load_then_quantize(tmp_path, smol_tokenizer, arch, tied, quantization,
                                                        embeddings):
    directory = _save(tmp_path / "model", arch, tied, smol_tokenizer)
    assert len(list(directory.glob("*.safetensors"))) > 1
    config = QLoraConfig(r=4, target_modules="all-linear", quantization=quantization, quantize_embeddings=embeddings,
                         compute_dtype="float32")
    dense, _ = load_model(str(directory), dtype="float32", tokenizer=smol_tokenizer)
    expected_record = base_record(dense)
    quantize_base(dense, quantization, "float32", True, quantize_embeddings=embeddings)
    streamed, _ = load_model(str(directory), dtype="float32", tokenizer=smol_tokenizer, quantize=config)
    ours, theirs = _quantized_and_dense(streamed), _quantized_and_dense(dense)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert sum(is_quantized(m) for m in streamed.modules()) == sum(is_quantized(m) for m in dense.modules()) > 0
    assert base_record(streamed) == expected_record  # adapters record the checkpoint as loaded
    input_ids = torch.randint(3, 200, (2, 9))
    # train mode, then eval mode last (bitsandbytes repacks a 4-bit weight in place on its first
    # eval-mode forward, after which it no longer dequantizes: the weights are compared above)
    for mode in ("train", "eval"):
        getattr(streamed, mode)()
        getattr(dense, mode)()
        with torch.no_grad():
            assert torch.equal(streamed(input_ids).logits, dense(input_ids).logits), mode
    assert not any(p.is_meta for p in streamed.parameters()) and not any(b.is_meta for b in streamed.buffers())


@pytest.mark.parametrize("tied", [True, False])
def test_streaming_load_in_many_row_chunks_equals_dense_load(tmp_path, smol_tokenizer, monkeypatch, tied):
    """Every 4-bit matrix read 64 rows at a time (several chunks each: the 256-row table, the
    128-row MLP weights) still gives the dense load's quantized model, to the bit."""
    from lorakit.adapters.qlora import streamed

    chunks = []
    quantize = streamed.quantize_4bit_by_rows
    monkeypatch.setattr(streamed, "CHUNK_VALUES", 64 * 64)
    monkeypatch.setattr(streamed, "quantize_4bit_by_rows", lambda read_rows, shape, *a, **kw: chunks.append(
        streamed.chunk_rows(shape[1])) or quantize(read_rows, shape, *a, **kw))
    test_streaming_load_equals_dense_load_then_quantize(tmp_path, smol_tokenizer, "llama", tied, "nf4", None)
    assert chunks and set(chunks) == {64}
