"""QLoRA (Dettmers et al. 2023): LoRA over a frozen 4-bit NF4 base with double quantization.

Quantization belongs to the *base* layer (``base.py``): ``quantize_base(model, "nf4")`` turns the
model's linear layers into bitsandbytes layers, and the ordinary LoraLayer wraps them. The
``qlora`` method in the registry (config ``QLoraConfig``: LoraConfig plus quantization,
compute_dtype, double_quant) is LoRA with that step folded into attaching: a target layer that
is not quantized yet is quantized as it is wrapped. With ``target_modules: all-linear`` that is
every linear layer but the output head. The embedding and the output head (one table when
tied) are quantized by ``quantize_base`` (``quantize_embeddings``, on by default for 4-bit; see
base.py for why), not by attaching, which sees one layer at a time: call
``config.prepare_base(model)`` (= ``quantize_base`` with the config's settings) on the base
before injecting to quantize the whole base. The saved adapter is a plain LoRA adapter
(peft_type LORA; the quantization keys are not written).
"""

from __future__ import annotations

from torch import nn

from lorakit.adapters.lora import LoraLayer, attach_lora

from lorakit.adapters.qlora.base import (QUANT_CHOICES, BaseWeightMemory, base_weight_memory, dense_linear,
                                         dense_weight, dequantize_base, dequantize_weight, is_quantized,
                                         quantize_base, quantize_embedding_and_head, quantize_linear,
                                         resolve_compute_dtype)
from lorakit._quantized_embedding import QuantizedEmbedding
from lorakit.adapters.qlora.config import QLoraConfig


def attach_qlora(module: nn.Module, adapter_name: str, config: QLoraConfig, module_name: str) -> nn.Module:
    """attach_lora over a quantized base: quantizes ``module`` as ``config`` says unless it is
    already a quantized layer or a LoraLayer."""
    if not isinstance(module, LoraLayer) and not is_quantized(module):
        module = quantize_linear(module, getattr(config, "quantization", "nf4"),
                                 resolve_compute_dtype(getattr(config, "compute_dtype", "auto")),
                                 getattr(config, "double_quant", True))
    return attach_lora(module, adapter_name, config, module_name)


def qlora_prepare_base(model: nn.Module, config: QLoraConfig) -> None:
    """Quantize the whole base as ``config`` says before the adapters are attached."""
    config.prepare_base(model)


def qlora_report(model: nn.Module) -> str:
    """The training log's line on what the quantized base holds in memory."""
    return base_weight_memory(model).summary()


__all__ = ["qlora_prepare_base", "qlora_report", "QUANT_CHOICES", "BaseWeightMemory", "QLoraConfig", "QuantizedEmbedding", "attach_qlora", "base_weight_memory", "dense_linear",
           "dense_weight", "dequantize_base", "dequantize_weight", "is_quantized", "quantize_base",
           "quantize_embedding_and_head", "quantize_linear"]
