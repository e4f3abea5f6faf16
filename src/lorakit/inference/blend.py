"""Blend LoRA adapters into a new one: peft's ``add_weighted_adapter`` for linear / cat / svd.

For adapters i with weights w_i, scalings s_i and, per layer, A_i (r_i, in), B_i (out, r_i),
so that ΔW_i = s_i B_i A_i, the new adapter has scaling 1 (lora_alpha = r) and

- ``cat``:    A = [w_1 s_1 A_1; ...; w_n s_n A_n] (Σr_i, in),  B = [B_1 ... B_n] (out, Σr_i)
              ΔW = Σ_i w_i ΔW_i exactly; the rank is the sum of the ranks.
- ``svd``:    ΔW = Σ_i w_i ΔW_i, then its best rank-k approximation (Eckart-Young) from
              U S V^T = svd(ΔW):  B = U_k S_k (out, k),  A = V_k^T (k, in).
              k = ``svd_rank`` (default: the largest source rank), capped at min(out, in).
- ``linear``: all ranks equal (r). With c_i = w_i s_i (peft's convention, sign on A):
              A = Σ_i sign(c_i) sqrt|c_i| A_i,   B = Σ_i sqrt|c_i| B_i
              so ΔW = B A = Σ_i c_i B_i A_i + Σ_{i≠j} (cross terms B_i A_j). It equals the
              weighted sum of deltas when one weight is non-zero (e.g. (1, 0) gives adapter 1),
              not in general; use ``cat`` for the exact weighted sum or ``svd`` for it at rank k.

A module adapted by only some sources takes the others as zero. The result is an ordinary
LoRA adapter (rank_pattern records per-module ranks where they differ), saved in peft layout.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from lorakit.errors import LorakitError

COMBINATIONS = ("linear", "cat", "svd")


def _blend_layer(layer, sources, combination_type: str, svd_rank: int | None):
    """(A (r, in), B (out, r)) of the blend for one LoraLayer; sources: [(adapter, weight)]."""
    present = [(name, w) for name, w in sources if name in layer.lora_A]
    A_list = [layer.lora_A[n].weight.float() for n, _ in present]
    B_list = [layer.lora_B[n].weight.float() for n, _ in present]
    c = [w * layer.scaling[n] for n, w in present]
    if combination_type == "cat":
        A = torch.cat([ci * A for ci, A in zip(c, A_list)], dim=0)  # (Σr, in)
        return A, torch.cat(B_list, dim=1)  # (out, Σr)
    if combination_type == "linear":
        A = sum(math.copysign(math.sqrt(abs(ci)), ci) * A for ci, A in zip(c, A_list))  # (r, in)
        B = sum(math.sqrt(abs(ci)) * B for ci, B in zip(c, B_list))  # (out, r)
        return A, B
    delta = sum(ci * (B @ A) for ci, A, B in zip(c, A_list, B_list))  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(svd_rank, S.shape[0])
    return Vh[:k], U[:, :k] * S[:k]  # A (k, in), B (out, k)


def _check_sources(lora_model, adapters, weights, combination_type):
    if combination_type not in COMBINATIONS:
        raise LorakitError(f"unknown combination_type '{combination_type}'; valid choices: {', '.join(COMBINATIONS)}")
    if not adapters or len(adapters) != len(weights):
        raise LorakitError(f"blending needs one weight per adapter; got {len(adapters)} adapters and "
                           f"{len(weights)} weights")
    for name in adapters:
        config = lora_model.peft_config.get(name)
        if config is None:
            raise LorakitError(f"unknown adapter '{name}'; loaded: {', '.join(lora_model.peft_config)}")
        if getattr(config, "use_dora", False) or getattr(config, "peft_type", "LORA") != "LORA":
            raise LorakitError(f"adapter '{name}' is not a plain LoRA adapter; blending combines LoRA adapters only")
        if config.modules_to_save or config.bias != "none":
            raise LorakitError(f"adapter '{name}' has modules_to_save or trained biases, which cannot be blended")
    if combination_type == "linear":
        ranks = {(m, layer.r[n]) for m, layer in lora_model.adapter_layers() for n in adapters if n in layer.r}
        by_module = Counter(m for m, _ in ranks)
        uneven = [m for m, count in by_module.items() if count > 1]
        if uneven:
            found = sorted(r for m, r in ranks if m == uneven[0])
            raise LorakitError(f"'linear' blending needs equal ranks, but {uneven[0]} has ranks {found}; "
                               f"use combination_type 'cat' or 'svd'")


@torch.no_grad()
def blend_adapters(model, adapters: Sequence[str], weights: Sequence[float], new_name: str,
                   combination_type: str = "svd", svd_rank: int | None = None,
                   save_directory: str | Path | None = None):
    """Add adapter ``new_name`` = blend of ``adapters`` (see module docstring) and return its
    LoraConfig. ``model``: a LoraModel or MultiAdapterModel holding the sources. With
    ``save_directory`` the blend is also written there in peft layout. The active adapter
    does not change."""
    from lorakit.adapters import LoraConfig
    from lorakit.inference.multi_adapter import MultiAdapterModel

    multi = model if isinstance(model, MultiAdapterModel) else None
    lora_model = model.lora if multi is not None else model
    if lora_model is None:
        raise LorakitError("no adapters are loaded; load the adapters to blend first")
    if new_name in lora_model.peft_config:
        raise LorakitError(f"adapter '{new_name}' already exists; choose another name")
    _check_sources(lora_model, adapters, weights, combination_type)
    if svd_rank is None:
        svd_rank = max(layer.r[n] for _, layer in lora_model.adapter_layers() for n in adapters if n in layer.r)
    sources = list(zip(adapters, [float(w) for w in weights]))
    blended = {name: _blend_layer(layer, sources, combination_type, svd_rank)
               for name, layer in lora_model.adapter_layers() if any(a in layer.lora_A for a in adapters)}

    ranks = {name: A.shape[0] for name, (A, _) in blended.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    first = lora_model.peft_config[adapters[0]]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(blended), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=first.lora_dropout, use_rslora=False,
                        base_model_name_or_path=first.base_model_name_or_path, inference_mode=True)
    previous = lora_model.active_adapter
    lora_model.add_adapter(new_name, config)
    for name, layer in lora_model.adapter_layers():
        if name in blended:
            A, B = blended[name]
            layer.lora_A[new_name].weight.copy_(A)
            layer.lora_B[new_name].weight.copy_(B)
    for param in lora_model.adapter_state_dict(new_name).values():
        param.requires_grad_(False)
    if multi is not None:
        multi._stacks = None
        multi._restore_active()
    elif previous in lora_model.peft_config:
        lora_model.set_adapter(previous)
    if save_directory is not None:
        save_adapter(lora_model, new_name, save_directory)
    return config


def save_adapter(lora_model, name: str, directory: str | Path) -> None:
    """Write one adapter of ``lora_model`` to ``directory`` in peft layout, its base's fingerprint
    in the file's metadata."""
    from lorakit.models import peft_format
    from lorakit.models.fingerprint import base_metadata

    config_dict = lora_model.peft_config[name].to_dict()
    config_dict["inference_mode"] = True
    peft_format.write_adapter_files(directory, config_dict, lora_model.adapter_state_dict(name),
                                    base_metadata(lora_model.model))
