"""Loss and perplexity on the labelled (response) tokens of a list of batches."""

from __future__ import annotations

import math

import torch
from torch.distributed.fsdp import FSDPModule

from lorakit.adapters.contract import AdaptedModel
from lorakit.data import IGNORE_INDEX, batch_to_device
from lorakit.training.fused_loss import linear_cross_entropy_sum
from lorakit.training import quantized_head_loss


def count_targets(batch: dict) -> int:
    """Tokens the loss is taken over: labels other than -100, after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict) -> int:
    """Tokens processed (non-padding when there is an attention mask; whole rows when packed)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


# Causal LMs whose forward is exactly ``lm_head(decoder(...)[0])`` (no logit scaling or
# softcapping): for these the loss can skip the output head on unlabelled positions.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2", "smollm3", "olmo2"}


def _plain_head_model(model):
    """The transformers model under a LoraModel when its head may be applied selectively, else None."""
    # a DDP-wrapped model is not an AdaptedModel: its own forward must run (gradient sync);
    # a method whose forward is more than the inner model's (prefix tokens, a regulariser) too
    if not isinstance(model, AdaptedModel) or not model.forward_is_inner_model:
        return None
    if isinstance(model, FSDPModule):  # its root forward gathers the sharded head
        return None
    inner = model.model
    config = getattr(inner, "config", None)
    if config is None or config.model_type not in _PLAIN_HEAD_TYPES or getattr(config, "final_logit_softcapping", None):
        return None
    if not hasattr(inner, getattr(inner, "base_model_prefix", "") or "-"):
        return None
    return inner


def labelled_loss_sum(lm, batch: dict) -> torch.Tensor:
    """Sum of token losses computed only where there is a label: decoder on all tokens, then the
    output head and cross-entropy on the N labelled positions, (N, H) -> loss, instead of
    (B, T, V) logits. A plain ``nn.Linear`` head goes through the fused, chunked head + loss
    (``fused_loss``: no (N, V) logits at all), a 4-bit head through ``quantized_head_loss`` (no
    dense (V, H) weight); any other head (quantized, adapted) is applied to
    the N rows and followed by cross-entropy. Same value as the model's own loss x N."""
    decoder = getattr(lm, lm.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs)[0]                      # (B, T, H)
    targets = batch["labels"][:, 1:]                   # position t predicts token t + 1
    keep = targets != IGNORE_INDEX                     # (B, T-1)
    rows = hidden[:, :-1][keep]                        # (N, H)
    head = lm.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        return linear_cross_entropy_sum(rows, head.weight, head.bias, targets[keep])
    if quantized_head_loss.supports(head):  # a 4-bit head: read in vocabulary slices, never dense
        return quantized_head_loss.quantized_head_cross_entropy_sum(rows, head, targets[keep])
    return torch.nn.functional.cross_entropy(head(rows).float(), targets[keep], reduction="sum")  # (N, V) logits


def batch_loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens), so losses of batches with different
    numbers of targets combine exactly. A LoraModel over a plain-head architecture computes
    logits on labelled positions only; anything else (e.g. a DDP-wrapped model, whose forward
    must be called for gradient sync) uses the model's mean loss times the count."""
    n = count_targets(batch)
    batch = batch_to_device(batch, device)
    lm = _plain_head_model(model)
    if lm is not None:
        return labelled_loss_sum(lm, batch), n
    outputs = model(**batch)
    return outputs.loss.float() * n, n


@torch.no_grad()
def loss_sums(model, batches: list[dict], device) -> tuple[float, int]:
    """(loss sum, target tokens) over ``batches``, with the model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            loss_sum, n = batch_loss_sum(model, batch, device)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total, count


def loss_and_ppl(total: float, count: int) -> dict:
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def evaluate_loss(model, batches: list[dict], device="cpu") -> dict:
    """{"loss": mean token loss, "ppl": exp(loss), "tokens": target tokens} in one process."""
    return loss_and_ppl(*loss_sums(model, batches, device))
