"""PiSSA (Meng et al. 2024): LoRA initialised from the principal singular directions of W.

    W = U S Vᵀ (out, in).  With the top r triplets (U_r, S_r, V_r) and scaling s:
        A0 = sqrt(S_r / s) V_rᵀ   (r, in)        B0 = U_r sqrt(S_r / s)   (out, r)
        W_res = W - s · B0 A0                     (the frozen base becomes the residual)

so the adapted layer equals the base at init (W_res + s·B0 A0 = W) while training moves the
principal part. This is peft's ``pissa_init`` exactly (its names: V ↔ our U, Uh ↔ our Vᵀ);
``pissa_niter_N`` uses ``torch.svd_lowrank`` with N subspace iterations (fast, approximate).

Saving. A PiSSA adapter only makes sense on the residual base, so lorakit always saves it
converted to a plain LoRA adapter for the ORIGINAL base (peft's
``path_initial_model_for_weight_conversion``): after training W + ΔW = W_res + s·BA, so

    ΔW = s·(BA - B0 A0) = s'·B' A'   with  A' = [A; A0] (2r, in),  B' = [B, -B0] (out, 2r)

and the config records r' = 2r and alpha' = 2·alpha (alpha·sqrt(2) with rsLoRA), so that
s' = s, and ``init_lora_weights: true``. ``save_pretrained(..., convert_pissa_to_lora=False)``
writes the raw factors instead (useful only together with the residual base model).
"""

from __future__ import annotations

import math

import torch

from lorakit._file_keys import file_key
from lorakit._quantized import dense_weight, is_quantized
from lorakit.errors import LorakitError

_TABLES = ("lora_A", "lora_B")


def is_pissa(init_lora_weights) -> bool:
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa")


def pissa_niter(init_lora_weights: str) -> int | None:
    """None for exact "pissa", N for "pissa_niter_N"; an error for anything else."""
    if init_lora_weights == "pissa":
        return None
    prefix = "pissa_niter_"
    if init_lora_weights.startswith(prefix) and init_lora_weights[len(prefix):].isdigit():
        return int(init_lora_weights[len(prefix):])
    raise LorakitError(f"init_lora_weights must be 'pissa' or 'pissa_niter_<N>' (e.g. pissa_niter_4); "
                       f"got {init_lora_weights!r}")


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0 (r, in), B0 (out, r), W_res (out, in)) for W (out, in), computed in fp32."""
    W = weight.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scaling)
    A0 = root.unsqueeze(1) * Vh  # (r, in)
    B0 = U * root.unsqueeze(0)  # (out, r)
    return A0, B0, W - scaling * (B0 @ A0)


@torch.no_grad()
def pissa_init(layer, name: str, niter: int | None) -> None:
    """Initialise adapter ``name`` of a LoraLayer from W's top-r singular directions and make the
    base weight the residual; the initial factors are kept (``layer.pissa_initial``) for saving."""
    base = layer.base_layer
    if is_quantized(base) or not base.weight.is_floating_point():
        raise LorakitError("PiSSA needs a floating-point base weight; initialise it before quantizing the base")
    A0, B0, residual = pissa_factors(dense_weight(base), layer.r[name], layer.scaling[name], niter)
    layer.lora_A[name].weight.copy_(A0)
    layer.lora_B[name].weight.copy_(B0)
    base.weight.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.weight.dtype))
    layer.pissa_initial[name] = (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone())


def pissa_to_lora_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor):
    """(A' (2r, in), B' (out, 2r)) with B'A' = BA - B0 A0 (see module docstring)."""
    return torch.cat([A, A0.to(A)], dim=0), torch.cat([B, -B0.to(B)], dim=1)


def converted_config_dict(config_dict: dict) -> dict:
    """The adapter_config of the converted adapter: rank 2r, alpha scaled so s is unchanged."""
    if config_dict.get("use_dora"):
        raise LorakitError("a PiSSA adapter with use_dora=True cannot be converted to plain LoRA; "
                           "save it with convert_pissa_to_lora=False")
    if config_dict.get("use_rslora") and (config_dict.get("rank_pattern") or config_dict.get("alpha_pattern")):
        raise LorakitError("converting PiSSA to LoRA does not support use_rslora with rank_pattern/alpha_pattern "
                           "(as in peft); save with convert_pissa_to_lora=False")
    factor = math.sqrt(2) if config_dict.get("use_rslora") else 2
    out = dict(config_dict, init_lora_weights=True, r=2 * config_dict["r"],
               lora_alpha=config_dict["lora_alpha"] * factor)
    out["rank_pattern"] = {k: 2 * v for k, v in (config_dict.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: 2 * v for k, v in (config_dict.get("alpha_pattern") or {}).items()}
    return out


def converted_tensors(layers, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each LoRA layer's lora_A / lora_B file tensors by the rank-2r LoRA factors.
    layers: (module name, LoraLayer) pairs of the model."""
    out = dict(tensors)
    for module_name, module in layers:
        initial = module.pissa_initial.get(adapter_name)
        if initial is None:
            continue
        key_A = file_key(f"{module_name}.lora_A.{adapter_name}.weight", adapter_name, _TABLES)
        key_B = file_key(f"{module_name}.lora_B.{adapter_name}.weight", adapter_name, _TABLES)
        out[key_A], out[key_B] = pissa_to_lora_factors(tensors[key_A].detach(), tensors[key_B].detach(), *initial)
    return out
