"""Per-token log-probabilities through a frozen output head, chunked: no (N, V) logits kept.

For hidden states h (N, H) of the N scored positions, a frozen head W (V, H), bias b (V) or None,
and targets t (N):

    z_i = W h_i + b,   ℓ_i = z_i[t_i] - logsumexp(z_i)            (fp32)
    ∂ℓ_i/∂h_i = -(softmax(z_i) - onehot(t_i)) W =: -G_i          (H,)

Preference losses are non-linear in the sequence sums of ℓ, so the incoming gradient differs per
token: forward stores G (N, H) (computed chunk by chunk while the chunk's logits exist) and
backward returns -G · ∂L/∂ℓ row-wise. The plain path (``log_softmax(head(h))``) keeps a (N, V)
fp32 tensor for backward; this keeps (N, H): on SmolLM2 (V = 49152, H = 576) 85x less, with the
same FLOPs (the G W product moves from backward into forward). Only for a head that does not
train (LoRA and its variants: the head is frozen); a trained head takes the plain path.
"""

from __future__ import annotations

import torch

from lorakit.training.fused_loss import DEFAULT_CHUNK_ELEMENTS, _chunk_rows


def _logps_and_grads(hidden, weight, bias, targets, chunk_rows: int, need_grad: bool):
    """(ℓ (N,) fp32, G (N, H) in hidden's dtype or None)."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grads = torch.empty_like(hidden) if need_grad else None
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start: start + chunk_rows]                          # (C, H)
        t = targets[start: start + chunk_rows]                         # (C,)
        logits = torch.nn.functional.linear(h, weight, bias).float()   # (C, V)
        lse = torch.logsumexp(logits, dim=-1)                          # (C,)
        logps[start: start + chunk_rows] = logits.gather(1, t[:, None]).squeeze(1) - lse
        if need_grad:
            g = logits.sub_(lse[:, None]).exp_()                       # softmax, in place
            g[torch.arange(len(t), device=g.device), t] -= 1.0         # - onehot(t)
            grads[start: start + chunk_rows] = g.to(weight.dtype) @ weight
    return logps, grads


class _FrozenHeadTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int):
        logps, grads = _logps_and_grads(hidden, weight, bias, targets, chunk_rows, ctx.needs_input_grad[0])
        ctx.save_for_backward(grads)
        return logps

    @staticmethod
    def backward(ctx, grad_output):
        (grads,) = ctx.saved_tensors
        return -grads * grad_output[:, None].to(grads.dtype), None, None, None, None


def frozen_head_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """ℓ (N,) fp32 = log_softmax(hidden @ weightᵀ + bias)[targets], differentiable in ``hidden``
    only (``weight`` / ``bias`` must not require grad), equal in value and gradient to
    ``log_softmax(F.linear(hidden, weight, bias).float(), -1).gather(...)``."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_head_token_logps needs a frozen head; use the plain path for a trained one")
    rows = _chunk_rows(weight.shape[0], chunk_elements)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            return _logps_and_grads(hidden, weight, bias, targets, rows, False)[0]
    return _FrozenHeadTokenLogps.apply(hidden, weight, bias, targets, rows)
