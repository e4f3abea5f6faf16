"""Pure DoRA math (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

    W' = m ⊙ (W + s·BA) / ||W + s·BA||_c          W: (out, in), A: (r, in), B: (out, r), m: (out,)

||·||_c is the L2 norm of each output row over the input dim (peft: ``norm(dim=1)`` of the
(out, in) weight). With g = m / n, n = ||W + s·BA||_c treated as a constant in backward (paper
§4.3, as peft does), the layer output is

    y = b + g ⊙ (W x + s·B A x)                   x: (..., in) -> y: (..., out)

so the frozen base's own output W x is reused and W' is never built.

The row norm without an (out, in) temporary, in O(out·in·r) (W is frozen, so ||W||²_c is cached):

    n² = ||W||²_c + 2s · rowsum((W Aᵀ) ⊙ B) + s² · rowsum((B (A Aᵀ)) ⊙ B)
         W Aᵀ: (out, r)     A Aᵀ: (r, r)
"""

from __future__ import annotations

import torch

# Rows of a half-precision W converted to fp32 at a time when computing norms (bounds the temporary).
_ROW_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(weight: torch.Tensor):
    """Row blocks of ``weight`` (out, in) in at least fp32 (a copy of one block at a time)."""
    if weight.dtype in (torch.float32, torch.float64):
        yield weight
        return
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for block in weight.split(rows, dim=0):
        yield block.float()


@torch.no_grad()
def row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||² for each output row j of W (out, in) -> (out,), in at least fp32."""
    return torch.cat([block.pow(2).sum(dim=1) for block in _row_chunks(weight)])


@torch.no_grad()
def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """n = ||W + s·BA||_c (out,) for W (out, in), A (r, in), B (out, r), without forming W + s·BA.

    ``weight_sq_norm`` is ``row_sq_norm(W)`` when the caller caches it. Returned in A's dtype."""
    dtype = lora_A.dtype
    A = lora_A.detach()
    B = lora_B.detach()
    if weight_sq_norm is None:
        weight_sq_norm = row_sq_norm(weight)
    W_At = torch.cat([block.to(dtype) @ A.T for block in _row_chunks(weight)])  # (out, r)
    cross = (W_At * B).sum(dim=1)  # <W_j, (BA)_j>
    lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # ||(BA)_j||² = B_j (A Aᵀ) B_jᵀ
    norm_sq = weight_sq_norm.to(dtype) + (2 * scaling) * cross + (scaling * scaling) * lora_sq
    return norm_sq.clamp_min(0).sqrt()


@torch.no_grad()
def dora_row_norm_dense(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + ΔW||_c (out,) with ΔW = s·BA already formed (merging, where W' is built anyway)."""
    return torch.linalg.vector_norm(weight.float() + delta.float(), dim=1)


class _MagnitudeScale(torch.autograd.Function):
    """out = (g ⊙ z).to(out_dtype) over the last dim; z: (..., out), g: (out,).

    Backward needs z for g's gradient. Saving the *output* instead (z = out / g) means the
    tensor is shared with whatever consumes it next (SiLU, the gated product, attention), so
    DoRA adds almost no activation memory over LoRA. When some g_j is 0, z is saved instead.
    With a bf16 output (bf16 base), z is recovered at the output's precision, the precision
    the base's own output has there."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        out = (z * g).to(out_dtype)
        ctx.saved_output = not bool((g == 0).any())
        ctx.save_for_backward(out if ctx.saved_output else z, g)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved, g = ctx.saved_tensors
        grad_out = grad_out.to(g.dtype)
        grad_z = grad_out * g if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[1]:
            z = saved.to(g.dtype) / g if ctx.saved_output else saved
            grad_g = (grad_out * z).reshape(-1, g.shape[0]).sum(dim=0)
        return grad_z, grad_g, None


def magnitude_scale(z: torch.Tensor, g: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(g ⊙ z).to(out_dtype) broadcast over the last dim; memory-lean in training (see
    ``_MagnitudeScale``)."""
    out_dtype = out_dtype or z.dtype
    if torch.is_grad_enabled() and (z.requires_grad or g.requires_grad):
        return _MagnitudeScale.apply(z, g, out_dtype)
    return (z * g).to(out_dtype)
