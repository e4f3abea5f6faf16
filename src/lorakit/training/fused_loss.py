"""Output head + cross-entropy fused and chunked over rows: the loss without (N, V) logits.

For hidden states h (N, H) of the N labelled positions, head weight W (V, H), optional bias
b (V), and targets t (N):

    z_i = W h_i + b                     (V,)   logits of row i
    loss = Σ_i  logsumexp(z_i) - z_i[t_i]
    ∂loss/∂z_i = softmax(z_i) - onehot(t_i)    =: g_i
    ∂loss/∂h   = G W,   ∂loss/∂W = Gᵀ h,   ∂loss/∂b = Σ_i g_i

The plain path (``cross_entropy(lm_head(h))``) keeps a (N, V) fp32 logits tensor, writes a
second one in log_softmax, and in backward allocates and zero-fills a third for the one-hot
gradient before log_softmax's backward pass: on SmolLM2 (V = 49152) with N = 1024 that is three
200 MB tensors and ~10% of a LoRA step. Here rows are processed ``chunk`` at a time: each
chunk's logits are computed, reduced to its loss, turned *in place* into its gradient g, and
multiplied back to ∂loss/∂h (and ∂loss/∂W when the head trains) during the forward pass;
backward only scales the stored gradients by the incoming grad. Peak extra memory is one
(chunk, V) fp32 block; FLOPs are the same as the plain path (2·N·H·V forward, as much again
for ∂h, and again for ∂W if the head trains).

Numerics: logits are formed in the head's dtype (bf16 matmul on a bf16 base, as the plain path)
and reduced in fp32; gradients are fp32 until cast to the dtypes of h and W.
"""

from __future__ import annotations

import torch

# Rows per chunk: chunk × V fp32 logits ≈ 32 MiB at V = 49152, large enough that the head matmul
# runs at full speed, small enough to stay far below the (N, V) tensors it replaces.
DEFAULT_CHUNK_ELEMENTS = 8 * 2**20


def _chunk_rows(vocab: int, chunk_elements: int) -> int:
    return max(16, chunk_elements // max(vocab, 1))


def _loss_and_grads(hidden, weight, bias, targets, chunk_rows: int, need: tuple[bool, bool, bool]):
    """(loss sum, ∂/∂hidden, ∂/∂weight, ∂/∂bias): each gradient None unless ``need`` asks for it."""
    grad_hidden = torch.empty_like(hidden) if need[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start: start + chunk_rows]                        # (C, H)
        t = targets[start: start + chunk_rows]                       # (C,)
        logits = torch.nn.functional.linear(h, weight, bias).float()  # (C, V)
        lse = torch.logsumexp(logits, dim=-1)                        # (C,)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not any(need):
            continue
        grad = logits.sub_(lse[:, None]).exp_()                      # softmax, in place: (C, V)
        grad[torch.arange(len(t), device=grad.device), t] -= 1.0     # - onehot(t)
        if grad_hidden is not None:
            grad_hidden[start: start + chunk_rows] = grad.to(weight.dtype) @ weight  # (C, H)
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, h.float())                    # (V, H)
        if grad_bias is not None:
            grad_bias += grad.sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(W h_i + b, t_i); the gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int):
        total, *grads = _loss_and_grads(hidden, weight, bias, targets, chunk_rows, ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
                None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
                None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Σ_i cross_entropy(hidden_i @ weightᵀ + bias, targets_i) as a fp32 scalar, equal to
    ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`` in value
    and gradients, without the (N, V) logits. hidden (N, H), weight (V, H), bias (V,) or None,
    targets (N,) of class ids (no ignore index: pass only the labelled rows)."""
    rows = _chunk_rows(weight.shape[0], chunk_elements)
    tracked = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    if not (torch.is_grad_enabled() and any(tracked)):  # evaluation: the reduction alone
        with torch.no_grad():
            return _loss_and_grads(hidden, weight, bias, targets, rows, (False, False, False))[0]
    return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows)
