"""Cross-entropy through a 4-bit output head without its dense weight: the head read in vocabulary slices.

A QLoRA base quantizes the output head (``quantize_embeddings``); bitsandbytes' ``Linear4bit``
dequantizes its whole weight W (V, H) for the forward and again for the backward. With a large
vocabulary that dense copy is most of a step's memory: Llama-3.2-3B's 128256 x 3072 head is
1.5 GiB in fp32, as much as the whole NF4 base. Here W is dequantized ``slice_rows`` vocabulary
rows at a time (``dequantize_rows``: the same values, bit for bit, from the slice's codes only).

For hidden states h (N, H) of the labelled positions, targets t (N) and a bias b (V) if any,
rows are taken ``chunk_rows`` at a time (C rows, C·V fp32 logits held at once):

    pass 1, every slice s of the vocabulary:   Z[:, s] = h_C · W_sᵀ + b_s        (C, |s|)
    loss_C = Σ_i logsumexp(Z_i) - Z_i[t_i]
    G = softmax(Z) - onehot(t)                 (in place over Z: (C, V))
    pass 2, every slice s:                      ∂loss/∂h_C += G[:, s] · W_s        (C, H)

The gradient is computed in forward (as ``fused_loss``) and backward only scales it. Peak extra
memory is one (C, V) fp32 logits block and one (|s|, H) dense slice, never (V, H); the price is
one more dequantization of the head per row chunk (two per chunk in all, as bitsandbytes does
per step when one chunk holds every row). A head small enough (DENSE_HEAD_ELEMENTS) is
dequantized once per step instead and its slices kept for every chunk and both passes. The head is frozen (a 4-bit weight has no gradient);
logits are formed in the layer's ``compute_dtype`` as ``Linear4bit`` does and reduced in fp32.
"""

from __future__ import annotations

import torch

from lorakit._quantized_embedding import block_absmax, dequantize_rows

# Logits held at once: C x V fp32 values (128 MiB; at V = 128256 that is 261 rows, every row of a
# 256-token sequence in one chunk, so the head is dequantized twice per step, as bitsandbytes does).
DEFAULT_LOGIT_ELEMENTS = 32 * 2**20
# Dense head rows at once: |s| x H (32 MiB fp32 at H = 3072).
DEFAULT_SLICE_ELEMENTS = 8 * 2**20
# A head of at most this many values is dequantized once per call and kept for every row chunk
# and both passes (SmolLM2's 49152 x 576 table: 108 MiB fp32, less than the logits it serves);
# a larger one is dequantized slice by slice in each pass.
DENSE_HEAD_ELEMENTS = 32 * 2**20


def supports(head) -> bool:
    """Whether ``head`` is a bitsandbytes 4-bit linear layer this module can read in row slices
    (each 64-value block inside one row)."""
    import sys

    if "bitsandbytes" not in sys.modules:
        return False
    if not isinstance(head, sys.modules["bitsandbytes"].nn.Linear4bit):
        return False
    state = getattr(head.weight, "quant_state", None)
    return state is not None and len(state.shape) == 2 and state.shape[1] % state.blocksize == 0


def _slices(vocab: int, slice_rows: int) -> list[slice]:
    return [slice(start, min(start + slice_rows, vocab)) for start in range(0, vocab, slice_rows)]


def _head_slices(head, slice_rows: int, absmax: torch.Tensor, compute: torch.dtype):
    """(vocabulary slice, dense W_s (|s|, H) in ``compute``, b_s or None) for every slice;
    ``absmax``: the head's un-nested block absmax (``block_absmax``), made once per call."""
    for part in _slices(head.weight.quant_state.shape[0], slice_rows):
        weight = dequantize_rows(head.weight, part, absmax).to(compute)
        yield part, weight, None if head.bias is None else head.bias[part].to(compute)


def _loss_and_grad(hidden, head, targets, chunk_rows: int, slice_rows: int, need_grad: bool):
    """(loss sum (fp32 scalar), ∂loss/∂hidden (N, H) or None)."""
    vocab, width = head.weight.quant_state.shape
    compute = head.compute_dtype or head.weight.quant_state.dtype
    absmax = block_absmax(head.weight.quant_state)  # (V·H/64,) fp32, for every slice of every pass
    kept = list(_head_slices(head, slice_rows, absmax, compute)) if vocab * width <= DENSE_HEAD_ELEMENTS else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_grad else None
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start: start + chunk_rows].to(compute)                      # (C, H)
        t = targets[start: start + chunk_rows]                                 # (C,)
        logits = torch.empty(h.shape[0], vocab, dtype=torch.float32, device=h.device)  # (C, V)
        for part, weight, bias in kept or _head_slices(head, slice_rows, absmax, compute):
            logits[:, part] = torch.nn.functional.linear(h, weight, bias)
        lse = torch.logsumexp(logits, dim=-1)                                  # (C,)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not need_grad:
            continue
        grad = logits.sub_(lse[:, None]).exp_()                                # softmax, in place
        grad[torch.arange(len(t), device=grad.device), t] -= 1.0               # - onehot(t)
        chunk_grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        for part, weight, _ in kept or _head_slices(head, slice_rows, absmax, compute):
            chunk_grad += (grad[:, part].to(compute) @ weight).float()         # (C, H), summed in fp32
        grad_hidden[start: start + chunk_rows] = chunk_grad.to(hidden.dtype)
    return total, grad_hidden


class _QuantizedHeadCrossEntropySum(torch.autograd.Function):
    """sum_i CE(deq(W) h_i + b, t_i); the gradient for h is computed in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_rows: int, slice_rows: int):
        total, grad_hidden = _loss_and_grad(hidden, head, targets, chunk_rows, slice_rows, need_grad=True)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None


def quantized_head_cross_entropy_sum(hidden: torch.Tensor, head, targets: torch.Tensor,
                                     logit_elements: int = DEFAULT_LOGIT_ELEMENTS,
                                     slice_elements: int = DEFAULT_SLICE_ELEMENTS) -> torch.Tensor:
    """Σ_i cross_entropy(head(hidden_i), targets_i) as a fp32 scalar for a frozen 4-bit ``head``
    (``supports(head)``), equal in value and in ∂/∂hidden to ``F.cross_entropy(head(hidden).float(),
    targets, reduction="sum")`` up to summation order, without the head's dense weight. hidden
    (N, H), targets (N,) class ids (only the labelled rows)."""
    vocab, width = head.weight.quant_state.shape
    chunk_rows = max(1, logit_elements // vocab)
    slice_rows = max(1, slice_elements // width)
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # evaluation: the reduction alone
        with torch.no_grad():
            return _loss_and_grad(hidden, head, targets, chunk_rows, slice_rows, need_grad=False)[0]
    return _QuantizedHeadCrossEntropySum.apply(hidden, targets, head, chunk_rows, slice_rows)
