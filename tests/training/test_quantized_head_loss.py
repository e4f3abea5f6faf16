"""Cross-entropy through a 4-bit output head read in vocabulary slices (``quantized_head_loss``)
equals bitsandbytes' Linear4bit followed by cross-entropy, value and ∂/∂hidden (fp32 atol 1e-5;
bf16 compute within bf16 rounding), with several row chunks and slices, a bias, and on a QLoRA
model's own loss; and the dense head weight is never formed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import VOCAB

from lorakit import get_peft_model
from lorakit.adapters import QLoraConfig
from lorakit.adapters.qlora.base import quantize_linear
from lorakit.training import quantized_head_loss
from lorakit.training.evaluate import batch_loss_sum


def _head(vocab: int, width: int, bias: bool, compute: torch.dtype):
    torch.manual_seed(0)
    return quantize_linear(nn.Linear(width, vocab, bias=bias), "nf4", compute, True)


def _reference(head, hidden, targets):
    hidden = hidden.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    loss.backward()
    return loss.detach(), hidden.grad


@pytest.mark.parametrize("compute,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logit_rows,slice_rows", [(7, 300), (1000, 5000)])  # many chunks and slices; one of each
@pytest.mark.parametrize("kept", [True, False])  # the head's slices kept for the whole call, or made in each pass
def test_value_and_gradient_equal_linear4bit_then_cross_entropy(compute, atol, bias, logit_rows, slice_rows, kept,
                                                                monkeypatch):
    vocab, width, rows = 1000, 128, 29
    monkeypatch.setattr(quantized_head_loss, "DENSE_HEAD_ELEMENTS", vocab * width if kept else 0)
    head = _head(vocab, width, bias, compute)
    assert quantized_head_loss.supports(head)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, width, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    expected, expected_grad = _reference(head, hidden, targets)
    loss = quantized_head_loss.quantized_head_cross_entropy_sum(hidden, head, targets, logit_elements=logit_rows * vocab,
                                                                slice_elements=slice_rows * width)
    (2.0 * loss).backward()  # the incoming gradient scales the stored one
    assert torch.allclose(loss, expected, rtol=1e-6, atol=atol * rows)
    assert torch.allclose(hidden.grad, 2.0 * expected_grad, atol=atol)
    with torch.no_grad():  # evaluation: the same value
        assert torch.allclose(quantized_head_loss.quantized_head_cross_entropy_sum(hidden, head, targets), expected,
                              rtol=1e-6, atol=atol * rows)


@pytest.mark.parametrize("large", [True, False])
def test_a_large_head_is_read_in_slices_per_pass_and_a_small_one_once(monkeypatch, large):
    """Only slices of |s| <= slice rows are dequantized, never the whole (V, H) table: a head over
    DENSE_HEAD_ELEMENTS in each pass of each row chunk (2 chunks x 2 passes x 4 slices), a smaller
    one once per call (4 slices)."""
    import bitsandbytes.functional as bnbF

    head = _head(1000, 128, False, torch.float32)
    monkeypatch.setattr(quantized_head_loss, "DENSE_HEAD_ELEMENTS", 1000 * 128 - 1 if large else 1000 * 128)
    shapes, dequantize = [], bnbF.dequantize_4bit
    monkeypatch.setattr(bnbF, "dequantize_4bit", lambda a, state, *rest, **kw: shapes.append(tuple(state.shape))
                        or dequantize(a, state, *rest, **kw))
    hidden = torch.randn(10, 128, requires_grad=True)
    quantized_head_loss.quantized_head_cross_entropy_sum(hidden, head, torch.zeros(10, dtype=torch.long),
                                                         logit_elements=5 * 1000, slice_elements=256 * 128).backward()
    assert max(rows for rows, _ in shapes) == 256
    assert len(shapes) == (16 if large else 4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_qlora_model_loss_equals_its_own_forward(arch):
    """On a QLoRA model with a quantized (tied) head, lorakit's loss and adapter gradients equal the
    model's own forward (labels -> transformers' loss over Linear4bit logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shapes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)  # 64: bitsandbytes' 4-bit CPU path needs it
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shapes)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**shapes))
    config = QLoraConfig(r=4, target_modules=["q_proj", "v_proj"], compute_dtype="float32", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    assert quantized_head_loss.supports(peft_model.model.get_output_embeddings())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    loss, count = batch_loss_sum(peft_model, batch, "cpu")
    loss.backward()
    ours = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad(set_to_none=True)
    reference = peft_model.model(**batch).loss * count
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-5)
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(ours[name], parameter.grad, atol=1e-5), name
