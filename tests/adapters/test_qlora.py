"""QLoRA: LoRA over a bitsandbytes NF4 (double-quantized) base, on CPU.

What must hold: the quantized base's forward is the LoRA forward over the dequantized weight;
the NF4 error of a random matrix is what NF4's code book allows; merging dequantizes (never
re-quantizes); the saved adapter is plain LoRA; the built-in model's base weights shrink."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FP32_ATOL
from peft import PeftModel
from tiny_models import _COMMON, ARCHS, VOCAB, sample_input_ids, tiny_model
from torch import nn

from lorakit import LoraConfig, get_peft_model, load_adapter
from lorakit.adapters import get_method
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.qlora import (QLoraConfig, QuantizedEmbedding, base_weight_memory, dequantize_base,
                                    dequantize_weight, is_quantized, quantize_base, quantize_linear)
from lorakit.errors import LorakitError

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
    """The whole base, the tied 49152 x 576 embedding / output head (28% of the weights) included."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.bfloat16)
    bf16 = base_weight_memory(model)
    linear_only = base_weight_memory(quantize_base(copy.deepcopy(model), "nf4", quantize_embeddings=False))
    quantize_base(model, "nf4")
    memory = base_weight_memory(model)
    print(f"\nSmolLM2-135M bf16: {bf16.total_bytes / 2**20:.1f} MiB; NF4: {memory.summary()}"
          f"\n  linear layers only: {linear_only.summary()}")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and head.weight is embedding.weight  # one 4-bit table
    assert memory.quantized_layers == 30 * 7 + 2
    assert memory.quantized_bf16_bytes + memory.dense_bf16_bytes == bf16.dense_bf16_bytes
    assert memory.ratio_to_bf16 <= 0.35  # every base weight, quantization state and dense norms included
    assert linear_only.quantized_ratio_to_bf16 <= 0.35 < linear_only.ratio_to_bf16  # a bf16 table alone breaks it


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


# --- quantized embedding and output head ----------------------------------------------------

def _tied_llama(hidden_size=64, seed=0):
    """A tiny Llama with tied input embedding / output head; 64 | hidden_size, so lookups
    gather rows of 4-bit codes (hidden 32, as in tiny_model, dequantizes the whole table)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dict(_COMMON, hidden_size=hidden_size, tie_word_embeddings=True))
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dim", [128, 32])  # row gather (64 | dim), whole-table dequantization
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_quantized_embedding_lookup_is_the_lookup_in_the_dequantized_table(dim, quant):
    model = tiny_model("llama") if dim == 32 else _tied_llama(dim)
    table = model.get_input_embeddings().weight.detach().clone()
    quantize_base(model, quant, compute_dtype="float32")
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and embedding.weight.dtype == torch.uint8
    dequantized = dequantize_weight(embedding)
    assert dequantized.shape == table.shape and dequantized.dtype == table.dtype
    assert 0.05 < ((dequantized - table).norm() / table.norm()).item() < 0.2  # really 4-bit
    ids = torch.randint(0, VOCAB, (3, 17))
    assert torch.equal(embedding(ids), dequantized[ids])  # bit for bit
    assert torch.equal(embedding(ids[0, 0]), dequantized[ids[0, 0]])


@pytest.mark.parametrize("arch", ["tied_llama", "gpt2", "llama"])
def test_output_head_logits_are_a_linear_map_over_the_dequantized_table(arch):
    model = _tied_llama() if arch == "tied_llama" else tiny_model(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    quantize_base(model, "nf4")  # compute in bf16
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert is_quantized(head) and is_quantized(embedding)
    assert (head.weight is embedding.weight) == tied == (arch != "llama")  # tied: one quantized table
    x = torch.randn(2, 5, head.in_features)
    with torch.no_grad():
        expected = nn.functional.linear(x.to(torch.bfloat16), dequantize_weight(head).to(torch.bfloat16)).float()
        torch.testing.assert_close(head(x), expected, atol=1e-2, rtol=1e-2)
    memory = base_weight_memory(model)
    table_numel = embedding.num_embeddings * embedding.embedding_dim
    assert memory.quantized_bf16_bytes >= table_numel * 2 * (1 if tied else 2)
    dense = [p for p in model.parameters() if p.dtype != torch.uint8]  # norms, biases, GPT-2's positions
    assert memory.dense_bf16_bytes == 2 * (sum(p.numel() for p in dense) + sum(b.numel() for b in model.buffers()))


def test_tied_table_is_counted_once_and_stays_tied_through_deepcopy_and_dequantization():
    model = _tied_llama()
    before = base_weight_memory(model)  # all dense: parameters (the tied table once) and buffers
    assert before.dense_bf16_bytes == 2 * (sum(p.numel() for p in model.parameters())
                                           + sum(b.numel() for b in model.buffers()))
    quantize_base(model, "nf4", compute_dtype="float32")
    memory = base_weight_memory(model)
    assert memory.quantized_bf16_bytes + memory.dense_bf16_bytes == before.dense_bf16_bytes
    assert memory.quantized_layers == 2 * 7 + 2
    copied = copy.deepcopy(model)
    assert copied.get_output_embeddings().weight is copied.get_input_embeddings().weight
    ids = sample_input_ids()
    dense = dequantize_base(copy.deepcopy(model), torch.float32)
    embedding, head = dense.get_input_embeddings(), dense.get_output_embeddings()
    assert type(embedding) is nn.Embedding and type(head) is nn.Linear and head.weight is embedding.weight
    assert embedding.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(dense, ids), _logits(model, ids), atol=FP32_ATOL, rtol=0)
    assert dequantize_base(copy.deepcopy(model)).get_input_embeddings().weight.dtype == torch.float32  # as before


def test_lora_trains_over_quantized_embedding_and_tied_head():
    ids = sample_input_ids()
    model = quantize_base(_tied_llama(), "nf4", compute_dtype="bfloat16")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:  # lora_B starts at zero: only B gets a gradient on the first step
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_merge_over_quantized_embeddings_dequantizes_and_never_requantizes():
    ids = sample_input_ids()
    torch.manual_seed(0)
    model = get_peft_model(quantize_base(_tied_llama(), "nf4", compute_dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = _logits(model, ids)
    merged = model.merge_and_unload()
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert isinstance(merged.get_input_embeddings(), QuantizedEmbedding)  # unadapted: left as it was
    torch.testing.assert_close(_logits(merged, ids), expected, atol=FP32_ATOL, rtol=0)
    dense = dequantize_base(merged)
    assert not any(is_quantized(m) for m in dense.modules())
    assert dense.get_output_embeddings().weight is dense.get_input_embeddings().weight
    torch.testing.assert_close(_logits(dense, ids), expected, atol=FP32_ATOL, rtol=0)


def test_quantize_embeddings_option():
    assert type(quantize_base(tiny_model("llama"), "nf4", quantize_embeddings=False).get_input_embeddings()) \
        is nn.Embedding
    int8 = quantize_base(tiny_model("llama"), "int8")  # default for int8: dense embeddings
    assert type(int8.get_input_embeddings()) is nn.Embedding and type(int8.get_output_embeddings()) is nn.Linear
    with pytest.raises(LorakitError, match="4-bit"):
        quantize_base(tiny_model("llama"), "int8", quantize_embeddings=True)
    with pytest.raises(LorakitError, match="4-bit"):
        QLoraConfig(quantization="int8", quantize_embeddings=True)
    with pytest.warns(UserWarning, match="GemmaTextScaledWordEmbedding"):  # unsupported type, default: warn
        gemma = quantize_base(tiny_model("gemma"), "nf4")
    assert not is_quantized(gemma.get_input_embeddings()) and not is_quantized(gemma.get_output_embeddings())
    with pytest.raises(LorakitError, match="GemmaTextScaledWordEmbedding"):  # asked for explicitly: error
        quantize_base(tiny_model("gemma"), "nf4", quantize_embeddings=True)


def test_qlora_config_prepares_the_whole_base_and_keeps_the_key_out_of_the_adapter_config():
    config = QLoraConfig(r=2, target_modules=["q_proj"])
    assert "quantize_embeddings" not in config.to_dict() and "quantization" not in config.to_dict()
    model = config.prepare_base(tiny_model("gpt2"))
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert all(is_quantized(m) for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D"))
    dense = QLoraConfig(quantize_embeddings=False).prepare_base(tiny_model("gpt2"))
    assert type(dense.get_input_embeddings()) is nn.Embedding
