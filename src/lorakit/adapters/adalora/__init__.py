"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ΔW = P Λ Q · α/r₀, whose rank budget is
reallocated during training to the matrices where it matters most (see allocator.py)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.adalora.allocator import RankAllocator, kept_triplets, prune_tensors_by_rank_pattern
from lorakit.adapters.adalora.config import AdaLoraConfig
from lorakit.adapters.adalora.functional import svd_scale
from lorakit.adapters.adalora.layer import AdaLoraLayer
from lorakit.adapters.lora.layer import wrap_target
from lorakit.errors import LorakitError


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


def adalora_training_hooks(layers: list, adapter_name: str, config: AdaLoraConfig) -> RankAllocator:
    """The rank allocator of a trainable adapter: adds the orthogonality penalty to the loss
    (``extra_loss``) and reallocates rank after each optimizer step (``update_and_allocate``)."""
    config.check_schedule()  # total_step may have been filled in after construction (lorakit train)
    return RankAllocator(config, dict(layers), adapter_name)


def adalora_set_total_steps(config: AdaLoraConfig, total_steps: int) -> None:
    """The budget schedule runs over the training run: an unset total_step becomes its length."""
    if config.total_step is None:
        config.total_step = total_steps


def adalora_file_contents(model, adapter_name: str, config: AdaLoraConfig, publish: bool) -> tuple[dict, dict]:
    """Published: only the triplets rank_pattern kept, as peft saves them (a loaded adapter is
    built at the kept rank). Checkpoints (publish False) keep the training shapes (init_r, pruned
    triplets zero), which the optimizer state and a resume need."""
    tensors = model.adapter_state_dict(adapter_name)
    if publish:
        tensors = prune_tensors_by_rank_pattern(tensors, config.rank_pattern)
    return config.to_dict(), tensors


def adalora_delta_factors(config: AdaLoraConfig, module_name: str, tables: dict[str, torch.Tensor]):
    """(L (out, r), R (r, in)) with ΔW = L R = P (Λ ⊙ Q) · alpha / (r₀ + ε) for one module of a
    saved adapter (lora_A = Q (r, in), lora_E = Λ (r, 1), lora_B = P (out, r)); r is the kept
    count rank_pattern records (init_r without one). A LorakitError naming the module when the
    three do not fit together."""
    missing = [t for t in ("lora_A", "lora_E", "lora_B") if t not in tables]
    if missing:
        raise LorakitError(f"module '{module_name}': {missing[0]} is missing")
    A, E, B = tables["lora_A"], tables["lora_E"], tables["lora_B"]
    mask = kept_triplets(config.rank_pattern, module_name)
    r = config.init_r if mask is None else sum(mask)
    if A.dim() != 2 or B.dim() != 2 or tuple(E.shape) != (A.shape[0], 1) or A.shape[0] != B.shape[1] or A.shape[0] != r:
        raise LorakitError(f"module '{module_name}': lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)} and lora_B "
                           f"{tuple(B.shape)} do not fit rank r = {r} ((r, in), (r, 1), (out, r))")
    scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)  # as the layer sets it
    return B.double(), A.double() * E.double() * svd_scale(scaling, config.init_r)


__all__ = ["AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "adalora_delta_factors", "adalora_file_contents",
           "adalora_set_total_steps", "adalora_training_hooks", "attach_adalora"]
