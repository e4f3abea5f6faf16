"""LoRA (Hu et al. 2021): y = W x + (alpha / r) · B A x with A, B trainable and W frozen."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.lora.config import LoraConfig
from lorakit.adapters.lora.layer import LoraLayer, wrap_target


def attach_lora(module: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraLayer:
    """Wrap ``module`` in a LoraLayer (or reuse the wrapper) and add adapter ``adapter_name``
    with its rank and alpha resolved through rank_pattern / alpha_pattern."""
    from lorakit.models.targets import pattern_value

    layer = wrap_target(module, LoraLayer, module_name, "LoRA")
    layer.add_adapter(
        adapter_name,
        r=pattern_value(config.rank_pattern, module_name, config.r),
        lora_alpha=pattern_value(config.alpha_pattern, module_name, config.lora_alpha),
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        init_lora_weights=config.init_lora_weights,
        use_dora=config.use_dora,
    )
    return layer


__all__ = ["LoraConfig", "LoraLayer", "attach_lora"]
