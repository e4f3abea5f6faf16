"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ΔW = P Λ Q · α/r₀, whose rank budget is
reallocated during training to the matrices where it matters most (see allocator.py)."""

from __future__ import annotations

from torch import nn

from lorakit.adapters.adalora.allocator import RankAllocator, kept_triplets, prune_tensors_by_rank_pattern
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


__all__ = ["AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "adalora_file_contents", "adalora_set_total_steps",
           "adalora_training_hooks", "attach_adalora"]
