"""LoRA variants as strategies: how one adapter of a LoraLayer adds to the output and merges.

A LoraLayer holds one variant object per adapter (``layer.variants[name]``) and calls it; the
layer's forward and merge have no per-variant branches. Two variants exist:

    PLAIN  y = result + s · B A x                           (LoRA, rsLoRA, PiSSA after init)
    DORA   y = b + g ⊙ ((result - b) + s · B A x),  g = m / ||W + s·BA||_c   (adapters/dora)

rsLoRA is only a different s (``lora_scaling``); PiSSA is only a different initialisation
(``init_strategy``), after which the adapter is plain LoRA on the residual base.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from lorakit.adapters.pissa import is_pissa, pissa_init, pissa_niter


class LoraVariant(Protocol):
    """fusable: the plain single-adapter fast path (``functional.lora_linear``) computes this
    variant exactly. init runs after A and B exist; delete drops the variant's own state."""

    fusable: bool

    def init(self, layer, name: str) -> None: ...

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor: ...

    def merge_delta(self, layer, name: str) -> torch.Tensor: ...

    def unmerge_delta(self, layer, name: str) -> torch.Tensor: ...

    def delete(self, layer, name: str) -> None: ...


class PlainLora:
    """y = result + s·B A dropout(x); merging adds s·BA to W."""

    fusable = True

    def init(self, layer, name: str) -> None:
        pass

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + layer.adapter_output(name, x).to(result.dtype)

    def merge_delta(self, layer, name: str) -> torch.Tensor:
        return layer.get_delta_weight(name)

    def unmerge_delta(self, layer, name: str) -> torch.Tensor:
        return layer.get_delta_weight(name)

    def delete(self, layer, name: str) -> None:
        pass


PLAIN = PlainLora()


# --- initialisation strategies: (layer, adapter name) -> None, A and B already created --------

@torch.no_grad()
def _kaiming_a_zero_b(layer, name: str) -> None:
    """peft's default: A Kaiming-uniform, B = 0, so the adapter starts as the identity."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


@torch.no_grad()
def _gaussian_a_zero_b(layer, name: str) -> None:
    """A ~ N(0, 1/r), B = 0."""
    nn.init.normal_(layer.lora_A[name].weight, std=1.0 / layer.r[name])
    nn.init.zeros_(layer.lora_B[name].weight)


@torch.no_grad()
def _random_both(layer, name: str) -> None:
    """Both random: a non-identity adapter (peft's init_lora_weights=False, for tests)."""
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.kaiming_uniform_(layer.lora_B[name].weight, a=math.sqrt(5))


def init_strategy(init_lora_weights) -> Callable[[nn.Module, str], None]:
    """The initialisation ``init_lora_weights`` names: True, "gaussian", False, "pissa",
    "pissa_niter_<N>" (PiSSA: top-r singular directions of W; W becomes the residual)."""
    if is_pissa(init_lora_weights):
        niter = pissa_niter(init_lora_weights)
        return lambda layer, name: pissa_init(layer, name, niter)
    if init_lora_weights is False:
        return _random_both
    if init_lora_weights == "gaussian":
        return _gaussian_a_zero_b
    return _kaiming_a_zero_b
