"""How two adapters differ (``lorakit adapters diff A B``): their configs, and per adapted module
how far apart their weight updates are.

For a method with a weight update (registry ``delta_factors``: LoRA, QLoRA, AdaLoRA) each module
holds ΔW = L R (LoRA: L = s·B (out, r), R = A (r, in)); the distance of two updates is computed
from the factors, never materialising an (out, in) matrix:

    <ΔW_a, ΔW_b>_F = sum((L_aᵀ L_b) ⊙ (R_a R_bᵀ))                       (r_a, r_b) matrices
    ||ΔW_a - ΔW_b||_F = sqrt(||ΔW_a||² + ||ΔW_b||² - 2 <ΔW_a, ΔW_b>)
    cos(ΔW_a, ΔW_b)   = <ΔW_a, ΔW_b> / (||ΔW_a|| ||ΔW_b||)

in fp64, so two near-equal updates still get a distance accurate to ~1e-8 of their norms. A
module only one adapter adapts counts as ΔW = 0 in the other. Tensors outside a weight update
(biases, modules_to_save copies, bottleneck and prefix parameters) are compared as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lorakit.errors import LorakitError


def config_differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every adapter_config key whose values differ (a key
    one config lacks shows as None), sorted by key."""
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _updates(directory: Path):
    """(config dict, {module: (L, R)}, {file key: tensor} of the rest) of one adapter."""
    from lorakit.adapters import method_for_peft_type, parameter_tables
    from lorakit.inference.adapter_tools import module_tables
    from lorakit.models.peft_format import adapter_config_from_dict, read_adapter_config_dict, read_adapter_weights

    config_dict = read_adapter_config_dict(directory)
    config = adapter_config_from_dict(config_dict, directory)
    tensors = read_adapter_weights(directory)
    method = method_for_peft_type(config_dict["peft_type"])
    if method.delta_factors is None:
        return config_dict, {}, tensors
    modules, rest = module_tables(tensors, parameter_tables())
    try:
        factors = {name: method.delta_factors(config, name, tables) for name, tables in modules.items()}
    except LorakitError as err:
        raise LorakitError(f"{directory}: {err}") from None
    return config_dict, factors, rest


def _gram(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """<L_a R_a, L_b R_b>_F from the factors (see module docstring)."""
    return float(((a[0].T @ b[0]) * (a[1] @ b[1].T)).sum())


def _row(module: str, norm_a: float, norm_b: float, dot: float | None, note: str = "") -> dict:
    if dot is None:  # present in one adapter only: the other's update is 0
        distance, cosine = max(norm_a, norm_b), None
    else:
        distance = math.sqrt(max(norm_a ** 2 + norm_b ** 2 - 2 * dot, 0.0))
        cosine = dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else None
    return {"module": module, "norm_a": norm_a, "norm_b": norm_b, "distance": distance, "cosine": cosine,
            "note": note}


def diff_adapters(a: str | Path, b: str | Path) -> dict:
    """{"config": [(key, a value, b value)], "modules": [rows]} for adapters ``a`` and ``b``;
    a row is {"module", "norm_a", "norm_b", "distance" (||ΔW_a - ΔW_b||_F), "cosine" (None when
    an update is 0 or missing), "note" ("only in A", "only in B", "shapes differ", "")}, sorted
    by distance, largest first."""
    config_a, updates_a, rest_a = _updates(Path(a))
    config_b, updates_b, rest_b = _updates(Path(b))
    rows = []
    for module in sorted(set(updates_a) | set(updates_b)):
        fa, fb = updates_a.get(module), updates_b.get(module)
        norm_a = math.sqrt(max(_gram(fa, fa), 0.0)) if fa else 0.0
        norm_b = math.sqrt(max(_gram(fb, fb), 0.0)) if fb else 0.0
        if fa is None or fb is None:
            rows.append(_row(module, norm_a, norm_b, None, "only in A" if fb is None else "only in B"))
        elif (fa[0].shape[0], fa[1].shape[1]) != (fb[0].shape[0], fb[1].shape[1]):
            rows.append(_row(module, norm_a, norm_b, None, "shapes differ"))
        else:
            rows.append(_row(module, norm_a, norm_b, _gram(fa, fb)))
    for key in sorted(set(rest_a) | set(rest_b)):
        ta, tb = rest_a.get(key), rest_b.get(key)
        norm_a = float(ta.double().norm()) if ta is not None else 0.0
        norm_b = float(tb.double().norm()) if tb is not None else 0.0
        if ta is None or tb is None:
            rows.append(_row(key, norm_a, norm_b, None, "only in A" if tb is None else "only in B"))
        elif ta.shape != tb.shape:
            rows.append(_row(key, norm_a, norm_b, None, "shapes differ"))
        else:
            rows.append(_row(key, norm_a, norm_b, float((ta.double() * tb.double()).sum())))
    rows.sort(key=lambda row: (-row["distance"], row["module"]))
    return {"config": config_differences(config_a, config_b), "modules": rows}
