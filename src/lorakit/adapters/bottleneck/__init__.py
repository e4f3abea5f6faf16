"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): y = h + W_up σ(W_down h) after a
sublayer's output projection h, with only the adapters trained. A layer method: ``LoraModel``
injects, saves, loads and disables them like LoRA layers (files: ``peft_type`` BOTTLENECK,
lorakit's own layout, see layer.py); they cannot be merged into the base weights."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.bottleneck.config import (ATTENTION_OUTPUTS, MLP_OUTPUTS, NON_LINEARITIES, PLACEMENT_TARGETS,
                                                BottleneckConfig)
from lorakit.adapters.bottleneck.layer import MERGE_ERROR, BottleneckLayer, bottleneck_size
from lorakit.adapters.lora.layer import wrap_target

def attach_bottleneck(module: nn.Module, adapter_name: str, config: BottleneckConfig,
                      module_name: str) -> BottleneckLayer:
    """Wrap ``module`` (a Linear / Conv1D output projection) in a BottleneckLayer, or reuse the
    wrapper, and add ``adapter_name`` sized from the projection's output: d // reduction_factor."""
    layer = wrap_target(module, BottleneckLayer, module_name, "a bottleneck adapter")
    layer.add_adapter(
        adapter_name,
        bottleneck=bottleneck_size(layer.out_features, config.reduction_factor),
        non_linearity=config.non_linearity,
        dropout=config.adapter_dropout,
        init_weights=config.init_weights,
    )
    return layer


__all__ = ["ATTENTION_OUTPUTS", "MERGE_ERROR", "MLP_OUTPUTS", "NON_LINEARITIES", "PLACEMENT_TARGETS",
           "BottleneckConfig", "BottleneckLayer", "attach_bottleneck", "bottleneck_size"]
