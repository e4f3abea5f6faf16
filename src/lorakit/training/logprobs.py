"""Per-sequence log-probabilities of the labelled tokens, in fp32: what preference objectives compare.

For a row b with tokens x_0..x_{T-1} and a mask m over target positions t = 1..T-1 (labels other
than -100 after the causal shift),

    log π(y | x)_b = Σ_t m_{b,t} · log softmax(z_{b,t-1})[x_{b,t}]          (fp32)

where z_{b,t-1} (V,) are the logits at position t-1. On a model whose output head may be
applied selectively (``evaluate._plain_head_model``: a plain head, no DDP wrapper, no forward
of its own) the decoder runs on every token and the head only on the N masked positions,
(N, H) -> (N, V), instead of (B, T, V) logits; elsewhere the model's own forward gives the
logits; a frozen plain head (LoRA and its variants) goes through ``fused_logps``, which keeps no
(N, V) tensor for backward. Logits are formed in the head's dtype (bf16 on a bf16 base) and
reduced in fp32.
"""

from __future__ import annotations

import torch

from lorakit.data import IGNORE_INDEX
from lorakit.training.evaluate import _plain_head_model
from lorakit.training.fused_logps import frozen_head_token_logps


def _from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()                                                     # (N, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _scored_logps(model, input_ids, attention_mask, keep) -> torch.Tensor:
    """(N,) fp32 log-probs of the tokens after the positions where ``keep`` (B, T-1) is true."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    targets = input_ids[:, 1:][keep]                                            # position t-1 predicts token t
    lm = _plain_head_model(model)
    if lm is None:                                                              # the model's own forward
        return _from_logits(model(**inputs).logits[:, :-1][keep], targets)      # (B, T-1, V) -> (N, V)
    rows = getattr(lm, lm.base_model_prefix)(**inputs)[0][:, :-1][keep]        # (B, T, H) -> (N, H)
    head = lm.get_output_embeddings()
    frozen = not any(p.requires_grad for p in head.parameters())
    if type(head) is torch.nn.Linear and frozen:  # chunked, no (N, V) logits kept (fused_logps)
        return frozen_head_token_logps(rows, head.weight, head.bias, targets)
    return _from_logits(head(rows), targets)                                     # (N, V)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
    """(B, T-1) fp32 log-probabilities of tokens 1..T-1, zero where ``keep`` (B, T-1) is false."""
    picked = _scored_logps(model, input_ids, attention_mask, keep)              # (N,)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=picked.device)
    return out.masked_scatter(keep, picked)


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the target positions that carry a label."""
    return labels[:, 1:] != IGNORE_INDEX


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log-probs of the labelled tokens (B,) fp32, labelled-token counts (B,))."""
    keep = label_mask(labels)
    return token_logps(model, input_ids, attention_mask, keep).sum(1), keep.sum(1)
