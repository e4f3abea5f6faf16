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
    return torch.cat([torch.linalg.vector_norm(block, dim=1).square() for block in _row_chunks(weight)])


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


class _DoraCombine(torch.autograd.Function):
    """y = g ⊙ ((base - b) + s·lora) + b over the last dim, in one autograd node.

    base: (..., out) the base output (bias included), lora: (..., out) = B A x, g: (out,).
    Backward needs z = (base - b) + s·lora only for g's gradient, Σ_tokens ∂y ⊙ z. Without a
    bias that is Σ ∂y ⊙ y / g, so the node saves its *output*, which the next op (SiLU, the gated
    product, attention) keeps anyway: DoRA then adds almost no activation memory over LoRA, and
    neither ``base`` nor ``lora`` is kept. With a bias (or some g_j = 0) z itself is saved.
    With a bf16 output (bf16 base) z is recovered at the output's precision, the precision of
    the base's own output there."""

    @staticmethod
    def forward(ctx, base, lora, g, scaling: float, bias, out_dtype):
        z = torch.add(base.to(lora.dtype) if bias is None else base.to(lora.dtype) - bias, lora, alpha=scaling)
        ctx.scaling, ctx.base_dtype = scaling, base.dtype
        ctx.saved_output = bias is None and not bool((g == 0).any())
        if ctx.saved_output:
            out = z.mul_(g).to(out_dtype)  # z's buffer becomes the output
            ctx.save_for_backward(out, g)
            return out
        ctx.save_for_backward(z, g)
        return torch.addcmul(bias.to(z.dtype), z, g).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        saved, g = ctx.saved_tensors
        grad_out = grad_out.to(g.dtype)
        grad_base = grad_out * g  # (..., out)
        grad_lora = grad_base * ctx.scaling if ctx.needs_input_grad[1] else None
        grad_g = None
        if ctx.needs_input_grad[2]:
            grad_g = (grad_out * saved.to(g.dtype)).reshape(-1, g.shape[0]).sum(dim=0)  # Σ ∂y ⊙ (y or z)
            if ctx.saved_output:
                grad_g = grad_g / g
        return grad_base.to(ctx.base_dtype), grad_lora, grad_g, None, None, None


def dora_combine(base: torch.Tensor, lora: torch.Tensor, g: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """g ⊙ ((base - b) + s·lora) + b in ``out_dtype`` (default: base's dtype); base, lora: (..., out),
    g: (out,). Memory-lean in training (see ``_DoraCombine``)."""
    out_dtype = out_dtype or base.dtype
    if torch.is_grad_enabled() and (base.requires_grad or lora.requires_grad or g.requires_grad):
        return _DoraCombine.apply(base, lora, g, scaling, bias, out_dtype)
    base = base.to(lora.dtype)
    z = torch.add(base if bias is None else base - bias, lora, alpha=scaling)
    return (z.mul_(g) if bias is None else torch.addcmul(bias.to(z.dtype), z, g)).to(out_dtype)
