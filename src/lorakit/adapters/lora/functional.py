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


def _adapter_grads(grad_y, x, A, B, h, s: float, master_dtype):
    """(∂L/∂h (N, r), ∂L/∂A (r, in), ∂L/∂B (out, r)) of the low-rank term s · (x Aᵀ) Bᵀ, the
    factors' gradients in their master dtype; see ``_LoraLinear``."""
    grad_h = (grad_y @ B).mul_(s)                                      # (N, r)
    grad_B = (grad_y.T @ h).mul_(s).to(master_dtype)                   # (out, r)
    grad_A = (grad_h.T @ x).to(master_dtype)                           # (r, in)
    return grad_h, grad_A, grad_B


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ for a frozen W, with hand-written gradients.

    x (N, in), W (out, in), b (out,) or None, A (r, in), B (out, r). With h = x Aᵀ (N, r) and
    g = ∂L/∂y (N, out):
        ∂L/∂B = s · gᵀ h,   ∂L/∂h = s · g B,   ∂L/∂A = (∂L/∂h)ᵀ x,   ∂L/∂x = g W + (∂L/∂h) A
    The low-rank term is accumulated into the base product by the matmul itself (addmm with
    beta = 1), in forward and in backward, instead of autograd's separate scale and add passes
    over (N, out) and (N, in) tensors; h is the only activation saved besides x.

    Everything is computed in x's dtype (the base's). Over a bf16 base the fp32 adapter weights
    are rounded to bf16 for the product (A and B are small) and their gradients returned in fp32,
    as mixed-precision training does: the master weights and the optimizer stay fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)                   # no copy when dtypes match
        h = x @ A.T                                                    # (N, r)
        y = torch.nn.functional.linear(x, weight, bias)                # (N, out)
        y.addmm_(h, B.T, alpha=scaling)                                # + s · h Bᵀ, in place
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scaling, ctx.master_dtype = scaling, lora_A.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, A, B, h = ctx.saved_tensors
        grad_h, grad_A, grad_B = _adapter_grads(grad_y, x, A, B, h, ctx.scaling, ctx.master_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y @ weight).addmm_(grad_h, A)               # (N, in)
        return grad_x, None, None, grad_A, grad_B, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``F.linear(x, W, b) + scaling · F.linear(F.linear(x, A), B)`` for a frozen W and b (no
    gradient is returned for them), x (..., in) -> (..., out), computed in x's dtype; see
    ``_LoraLinear``."""
    flat = x.reshape(-1, x.shape[-1])                                  # (N, in)
    return _LoraLinear.apply(flat, weight, bias, lora_A, lora_B, scaling).view(*x.shape[:-1], weight.shape[0])


class _LoraLinear4bit(torch.autograd.Function):
    """``_LoraLinear`` over a frozen 4-bit base (QLoRA): the same fused math, with W = deq(Q(W))
    dequantized in forward and again in backward (as bitsandbytes' own 4-bit matmul does), never
    kept between them; everything in x's dtype, which is the layer's compute dtype."""

    @staticmethod
    def forward(ctx, x, packed, bias, lora_A, lora_B, scaling: float, quant_state):
        import bitsandbytes.functional as bnbF

        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        h = x @ A.T                                                    # (N, r)
        y = torch.nn.functional.linear(x, bnbF.dequantize_4bit(packed, quant_state).to(x.dtype), bias)
        y.addmm_(h, B.T, alpha=scaling)                                # + s · h Bᵀ, in place
        ctx.save_for_backward(x, A, B, h)
        ctx.packed, ctx.quant_state = packed, quant_state              # frozen codes: no copy
        ctx.scaling, ctx.master_dtype = scaling, lora_A.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        import bitsandbytes.functional as bnbF

        x, A, B, h = ctx.saved_tensors
        grad_h, grad_A, grad_B = _adapter_grads(grad_y, x, A, B, h, ctx.scaling, ctx.master_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = bnbF.dequantize_4bit(ctx.packed, ctx.quant_state).to(grad_y.dtype)  # (out, in)
            grad_x = (grad_y @ weight).addmm_(grad_h, A)               # (N, in)
        return grad_x, None, None, grad_A, grad_B, None, None


def lora_linear_4bit(x: torch.Tensor, base, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """``lora_linear`` over a bitsandbytes ``Linear4bit`` base whose compute dtype is x's dtype:
    ``base(x) + scaling · F.linear(F.linear(x, A), B)``, x (..., in) -> (..., out)."""
    flat = x.reshape(-1, x.shape[-1])                                  # (N, in)
    weight = base.weight
    out = _LoraLinear4bit.apply(flat, weight.data, base.bias, lora_A, lora_B, scaling, weight.quant_state)
    return out.view(*x.shape[:-1], weight.quant_state.shape[0])
