"""LoRA (Hu et al. 2021): y = W x + (alpha / r) · B A x with A, B trainable and W frozen."""

from __future__ import annotations

import torch
from torch import nn

from lorakit._modules import pattern_value
from lorakit.adapters import pissa
from lorakit.errors import LorakitError

from lorakit.adapters.lora.config import LoraConfig
from lorakit.adapters.lora.functional import lora_scaling
from lorakit.adapters.lora.layer import LoraLayer, wrap_target


def attach_lora(module: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraLayer:
    """Wrap ``module`` in a LoraLayer (or reuse the wrapper) and add adapter ``adapter_name``
    with its rank and alpha resolved through rank_pattern / alpha_pattern."""
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


def lora_file_contents(model, adapter_name: str, config: LoraConfig, publish: bool) -> tuple[dict, dict]:
    """(adapter_config dict, file tensors) of one LoRA adapter of a LoraModel. Published files
    of a PiSSA adapter hold the equivalent plain LoRA adapter for the original base (rank 2r,
    adapters/pissa); checkpoints (publish=False) keep PiSSA's raw factors, which resume needs."""
    config_dict, tensors = config.to_dict(), model.adapter_state_dict(adapter_name)
    if publish and pissa.is_pissa(config.init_lora_weights):
        config_dict = pissa.converted_config_dict(config_dict)
        layers = [(n, m) for n, m in model.adapter_layers() if isinstance(m, LoraLayer)]
        tensors = pissa.converted_tensors(layers, adapter_name, tensors)
    return config_dict, tensors


def lora_delta_factors(config: LoraConfig, module_name: str, tables: dict[str, torch.Tensor]):
    """(L (out, r), R (r, in)) with ΔW = L R = s · B A for one module of a saved adapter, from
    its file tensors by table (``lora_A`` (r, in), ``lora_B`` (out, r)); s from the module's
    rank and alpha (rank_pattern / alpha_pattern). DoRA: the low-rank term only (its magnitude
    vector rescales columns of W + ΔW and is not part of it). A LorakitError naming the module
    when A and B do not fit together or the rank is not the config's."""
    if "lora_A" not in tables or "lora_B" not in tables:
        missing = "lora_A" if "lora_A" not in tables else "lora_B"
        raise LorakitError(f"module '{module_name}': {missing} is missing")
    A, B = tables["lora_A"], tables["lora_B"]
    if A.dim() != 2 or B.dim() != 2:
        raise LorakitError(f"module '{module_name}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                           f"must be matrices")
    r = pattern_value(config.rank_pattern, module_name, config.r)
    if A.shape[0] != B.shape[1] or A.shape[0] != r:
        raise LorakitError(f"module '{module_name}': lora_A has {A.shape[0]} rows and lora_B {B.shape[1]} columns; "
                           f"both must be the rank r = {r}")
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return B.double() * lora_scaling(r, alpha, config.use_rslora), A.double()


__all__ = ["LoraConfig", "LoraLayer", "attach_lora", "lora_delta_factors", "lora_file_contents"]
