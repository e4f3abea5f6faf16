"""Pure LoRA math shared by layers, merging and offline tools.

LoRA (Hu et al. 2021): a frozen weight W (out, in) gets a low-rank update
    W' = W + s · B A,   A: (r, in), B: (out, r), s = alpha / r   (rsLoRA: alpha / sqrt(r)).
"""

from __future__ import annotations

import math

import torch


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), which keeps the
    update's magnitude stable as r grows."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 fan_in_fan_out: bool = False) -> torch.Tensor:
    """s · B A with shape (out, in); transposed to (in, out) for GPT-2 style Conv1D weights.

    Computed in fp32 at least, so merging a bf16 base does not lose the update's low bits.
    """
    compute_dtype = torch.promote_types(lora_A.dtype, torch.float32)
    delta = (lora_B.to(compute_dtype) @ lora_A.to(compute_dtype)) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def merge_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """W <- W + delta in place, adding in fp32 and rounding once to W's dtype."""
    weight.data.copy_((weight.data.float() + delta.float()).to(weight.dtype))


def unmerge_from(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """W <- W - delta in place (inverse of ``merge_into`` up to W's rounding)."""
    weight.data.copy_((weight.data.float() - delta.float()).to(weight.dtype))
