"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ΔW = P Λ Q · α/r₀, whose rank budget is
reallocated during training to the matrices where it matters most (see allocator.py)."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.adalora.allocator import RankAllocator, kept_triplets
from lorakit.adapters.adalora.config import AdaLoraConfig
from lorakit.adapters.adalora.layer import AdaLoraLayer
from lorakit.adapters.lora.layer import wrap_target


def attach_adalora(module: nn.Module, adapter_name: str, config: AdaLoraConfig, module_name: str) -> AdaLoraLayer:
    """Wrap ``module`` in an AdaLoraLayer (or reuse the wrapper) and add ``adapter_name`` with
    init_r triplets — or, when config.rank_pattern records this module (a loaded adapter),
    only the kept ones, still scaled by α / init_r as peft does."""
    layer = wrap_target(module, AdaLoraLayer, module_name, "AdaLoRA")
    mask = kept_triplets(config.rank_pattern, module_name)
    layer.add_adapter(
        adapter_name,
        r=config.init_r if mask is None else sum(mask),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=config.init_lora_weights,
        ranknum=config.init_r,
    )
    return layer


__all__ = ["AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "attach_adalora"]
