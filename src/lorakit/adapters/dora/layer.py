"""DoRA's per-adapter state and the few calls LoraLayer makes for a DoRA adapter.

A DoRA adapter is a LoRA adapter (``lora_A``, ``lora_B``) plus a trainable magnitude
m (out,), stored as peft stores it: ``<layer>.lora_magnitude_vector.<adapter>.weight`` in
memory, ``<layer>.lora_magnitude_vector`` on disk. Forward (see ``functional``):

    y = result + (g - 1) ⊙ (result - b) + g ⊙ s·B A x,   g = m / ||W + s·BA||_c (detached)
      = b + g ⊙ ((result - b) + s·B A x)                  result: (..., out), the base output

``result`` is the output accumulated so far (base plus earlier active adapters), as in peft.
With dropout p > 0 in training peft applies DoRA to the dropped input x̃ and recomputes the
base product on it; so do we (one extra W x̃ matmul, only in that case):

    y = result + g ⊙ (W x̃ + s·B A x̃) - W x̃
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.dora.functional import dora_combine, dora_row_norm, dora_row_norm_dense, row_sq_norm
from lorakit.adapters.lora.functional import delta_weight
from lorakit._quantized import dense_weight


class DoraMagnitude(nn.Module):
    """m (out,) for one adapter of one layer, plus caches that are not state:
    ||W||²_c of the frozen base (keyed on the weight's storage and version, cleared on merge)
    and the scale g used by the last merge (unmerge needs the pre-merge norm)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self._sq_norm_key = None
        self._sq_norm = None
        self.merge_scale: torch.Tensor | None = None

    def base_sq_norm(self, base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """||W||²_c (out,) of the frozen base, recomputed only when the base weight changes."""
        stored = base_layer.weight
        key = (stored.data_ptr(), stored._version, tuple(stored.shape), stored.dtype, stored.device)
        if key != self._sq_norm_key:
            self._sq_norm, self._sq_norm_key = row_sq_norm(weight), key
        return self._sq_norm

    def clear_cache(self) -> None:
        self._sq_norm_key = self._sq_norm = None

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}"


def _factors(layer, name: str):
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def weight_norm(layer, name: str) -> torch.Tensor:
    """n = ||W + s·BA||_c (out,) of adapter ``name`` over the (unmerged) base, without W + s·BA."""
    A, B, scaling = _factors(layer, name)
    W = dense_weight(layer.base_layer)  # (out, in)
    return dora_row_norm(W, A, B, scaling, layer.lora_magnitude_vector[name].base_sq_norm(layer.base_layer, W))


def init_dora(layer, name: str) -> None:
    """Add m = ||W + s·BA||_c (peft's init: W' = W at the start, whatever A and B are)."""
    A, B, scaling = _factors(layer, name)
    layer.lora_magnitude_vector[name] = DoraMagnitude(dora_row_norm(dense_weight(layer.base_layer), A, B, scaling))


def _clear_caches(layer) -> None:
    """The base weight is about to change through ``.data`` (no version bump): drop ||W||²."""
    for magnitude in layer.lora_magnitude_vector.values():
        magnitude.clear_cache()


def dora_forward(layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The layer output with DoRA adapter ``name`` applied on top of ``result`` (see module doc)."""
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
    g = layer.lora_magnitude_vector[name].weight / weight_norm(layer, name)  # (out,); grad to m only
    x = x.to(lora_A.weight.dtype)
    if layer.training and not isinstance(dropout, nn.Identity):
        x = dropout(x)
        W = dense_weight(layer.base_layer)
        base_dropped = F.linear(x.to(W.dtype), W).to(x.dtype)  # (..., out), no bias
        scaled = dora_combine(base_dropped, lora_B(lora_A(x)), g, scaling)  # g ⊙ (W x̃ + s·B A x̃)
        return result + (scaled - base_dropped).to(result.dtype)
    return dora_combine(result, lora_B(lora_A(x)), g, scaling, layer.base_layer.bias)  # (..., out)


@torch.no_grad()
def _unmerged_weight(layer) -> torch.Tensor:
    """The base weight (out, in, fp32) with every merged adapter undone, newest first."""
    W = dense_weight(layer.base_layer).float().clone()
    for other in reversed(layer.merged_adapters):
        delta = delta_weight(*_factors(layer, other))
        if other in layer.lora_magnitude_vector:
            W = W / layer.lora_magnitude_vector[other].merge_scale.float().unsqueeze(1) - delta
        else:
            W -= delta
    return W


def _to_layout(layer, delta: torch.Tensor) -> torch.Tensor:
    return delta.T if layer.fan_in_fan_out else delta


@torch.no_grad()
def dora_merge_delta(layer, name: str) -> torch.Tensor:
    """What merging DoRA adapter ``name`` adds to the current weight W_cur (base layout, fp32):

        W_new = g ⊙ (W_cur + s·BA),   g = m / ||W_base + s·BA||_c   (norm over the unmerged base,
        scale over W_cur: the same as forward, which rescales the output accumulated so far)."""
    A, B, scaling = _factors(layer, name)
    delta = delta_weight(A, B, scaling)  # (out, in)
    g = layer.lora_magnitude_vector[name].weight.float() / dora_row_norm_dense(_unmerged_weight(layer), delta)
    layer.lora_magnitude_vector[name].merge_scale = g
    _clear_caches(layer)
    current = dense_weight(layer.base_layer).float()
    g = g.unsqueeze(1)
    return _to_layout(layer, (g - 1) * current + g * delta)


@torch.no_grad()
def dora_unmerge_delta(layer, name: str) -> torch.Tensor:
    """What unmerging DoRA adapter ``name`` (the newest merged) subtracts: W_cur - (W_cur / g - s·BA)."""
    delta = delta_weight(*_factors(layer, name))
    g = layer.lora_magnitude_vector[name].merge_scale.float().unsqueeze(1)
    current = dense_weight(layer.base_layer).float()
    layer.lora_magnitude_vector[name].merge_scale = None
    _clear_caches(layer)
    return _to_layout(layer, current - (current / g - delta))


class DoraVariant:
    """DoRA as a LoraLayer variant strategy (adapters/lora/variants.py): the layer calls these
    for a DoRA adapter; its m lives in ``layer.lora_magnitude_vector[name]`` (peft's table)."""

    fusable = False

    def init(self, layer, name: str) -> None:
        init_dora(layer, name)

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return dora_forward(layer, name, x, result)

    def merge_delta(self, layer, name: str) -> torch.Tensor:
        return dora_merge_delta(layer, name)

    def unmerge_delta(self, layer, name: str) -> torch.Tensor:
        return dora_unmerge_delta(layer, name)

    def delete(self, layer, name: str) -> None:
        if name in layer.lora_magnitude_vector:
            del layer.lora_magnitude_vector[name]


DORA = DoraVariant()
