"""The estimate's arithmetic against counted tensors of real tiny models: parameter counts exact
for every architecture and method, QLoRA's 4-bit bytes equal to bitsandbytes' tensors, the
activations traced on a weightless model equal to what autograd keeps in a real forward, and
adapter / gradient / optimizer bytes equal to the real tensors' nbytes after a real AdamW step."""

from __future__ import annotations

import weakref

import pytest
import torch
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

from lorakit.adapters import AdaLoraConfig, BottleneckConfig, LoraConfig, QLoraConfig
from lorakit.adapters.full import FullConfig
from lorakit.adapters.qlora import base_weight_memory
from lorakit.estimate.activations import trace_activations
from lorakit.estimate.sizing import count_parameters, sizing_model
from lorakit.models.inject import get_peft_model


def _method_configs(targets):
    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=targets),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True),
        "rslora-bias": LoraConfig(r=2, target_modules="all-linear", use_rslora=True, bias="lora_only"),
        "adalora": AdaLoraConfig(init_r=4, target_r=2, target_modules=targets, total_step=10),
        "bottleneck": BottleneckConfig(),
        "full": FullConfig(),
    }


def _real_counts(model) -> tuple[int, int]:
    trainable = frozen = 0
    seen = set()
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            trainable += param.numel() if param.requires_grad else 0
            frozen += 0 if param.requires_grad else param.numel()
    return trainable, frozen


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["lora", "dora", "rslora-bias", "adalora", "bottleneck", "full"])
def test_parameter_counts_equal_the_real_adapted_model(arch, method):
    targets = ARCHS[arch][1]
    real = get_peft_model(tiny_model(arch), _method_configs(targets)[method])
    meta = sizing_model(real.model.config, _method_configs(targets)[method], torch.float32)
    counts = count_parameters(meta)
    assert (counts.trainable, counts.frozen) == _real_counts(real)
    buffers = sum(b.nbytes for b in real.buffers())
    assert counts.frozen_bytes == counts.frozen * 4 + buffers and counts.trainable_bytes == counts.trainable * 4
    assert counts.frozen_by_dtype == ({"float32": counts.frozen} if counts.frozen else {})


@pytest.mark.parametrize("quantization,double_quant,embeddings",
                         [("nf4", True, None), ("nf4", False, False), ("fp4", True, True), ("int8", True, None)])
def test_quantized_weight_bytes_equal_bitsandbytes_tensors(quantization, double_quant, embeddings):
    config = dict(r=4, target_modules="all-linear", quantization=quantization, double_quant=double_quant,
                  quantize_embeddings=embeddings, compute_dtype="float32")
    # hidden 64: bitsandbytes' 4-bit CPU path needs in_features >= 64
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    real = get_peft_model(base, QLoraConfig(**config))
    meta = sizing_model(real.model.config, QLoraConfig(**config), torch.float32)
    counts = count_parameters(meta, QLoraConfig(**config))
    measured = base_weight_memory(real)
    assert counts.frozen_bytes == measured.total_bytes
    assert (counts.trainable, counts.frozen) == (_real_counts(real)[0], sum(counts.frozen_by_dtype.values()))
    assert set(counts.frozen_by_dtype) == {quantization, "float32"}


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _saved_bytes_of_a_real_forward(adapted, batch: int, seq: int) -> int:
    """What autograd still holds after a real forward of the decoder on real weights (each
    storage once, parameters and buffers excluded), seen through saved-tensor hooks."""
    lm = adapted.model
    decoder = getattr(lm, lm.base_model_prefix)
    kept = weakref.WeakSet()

    def pack(tensor):
        held = _Held(tensor)
        kept.add(held)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
        # a padded batch, as unpacked training sees (a packed row of several samples has a mask too)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0
        hidden = decoder(input_ids=torch.randint(3, 100, (batch, seq)), attention_mask=mask,  # noqa: F841 (graph)
                         use_cache=False)[0]
    params = {t.untyped_storage().data_ptr() for t in list(adapted.parameters()) + list(adapted.buffers())}
    live = {h.tensor.untyped_storage().data_ptr(): h.tensor.untyped_storage().nbytes() for h in list(kept)}
    return sum(size for ptr, size in live.items() if ptr not in params)




@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_traced_activations_equal_what_autograd_keeps_in_a_real_forward(arch, dtype):
    targets = ARCHS[arch][1]
    config = tiny_model(arch).config
    torch.manual_seed(0)
    real_base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    real = get_peft_model(real_base, LoraConfig(r=4, target_modules=targets, lora_dropout=0.1))
    real.train()
    meta = sizing_model(config, LoraConfig(r=4, target_modules=targets, lora_dropout=0.1), dtype)
    meta.train()
    trace = trace_activations(meta, 3, 20)
    assert trace.total == _saved_bytes_of_a_real_forward(real, 3, 20)
    assert trace.grad_layers == 2 and sum(trace.per_layer) <= trace.total
    # gradient checkpointing keeps one (B, T, H) input per layer and recomputes one layer
    assert trace.with_checkpointing() < trace.total


def test_layers_below_the_lowest_adapted_one_keep_nothing():
    config = tiny_model("llama").config
    meta = sizing_model(config, LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]), torch.float32)
    trace = trace_activations(meta, 2, 16)
    assert trace.per_layer[0] == 0 and trace.per_layer[1] > 0 and trace.grad_layers == 1


def test_adapter_gradient_and_optimizer_bytes_equal_real_tensors_after_an_adamw_step():
    targets = ARCHS["llama"][1]
    real = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=targets))
    counts = count_parameters(sizing_model(real.model.config, LoraConfig(r=4, target_modules=targets),
                                           torch.float32))
    trainable = [p for p in real.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    real.train()
    real(input_ids=torch.randint(3, 100, (2, 8)), labels=torch.randint(3, 100, (2, 8))).loss.backward()
    optimizer.step()
    assert counts.trainable_bytes == sum(p.nbytes for p in trainable)                       # adapter
    assert counts.trainable_bytes == sum(p.grad.nbytes for p in trainable)                  # gradients
    moments = sum(t.nbytes for state in optimizer.state.values() for k, t in state.items() if k != "step")
    assert 2 * counts.trainable_bytes == moments                                             # optimizer
