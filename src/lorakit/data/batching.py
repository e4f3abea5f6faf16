"""Samples -> batches a transformers causal LM takes as ``model(**batch)``.

Padded batch (packing off): input_ids (B, T) right-padded with pad_token_id, labels (B, T)
with -100 on padding, attention_mask (B, T) with 0 on padding.

Packed batch (packing on): each row concatenates several whole samples (up to max_seq_len
tokens); keys input_ids (B, T), labels (B, T), position_ids (B, T) restarting at 0 at every
sample, and *no* attention_mask. Why this is exact in transformers 5.x: with attention_mask
None and no cache, ``masking_utils.create_causal_mask`` (and the sliding-window variant)
derives the sample boundaries from position_ids (``find_packed_sequence_indices``: a new
sample starts wherever position_ids does not increase by 1) and ANDs a same-sample mask into
the causal mask, for eager, sdpa and flex attention alike (flash attention reads the
boundaries from position_ids too). Position embeddings (RoPE or learned, as in GPT-2) see
each sample's own positions. The label of each sample's first token is set to -100 so the
last token of one sample is never asked to predict the first token of the next (unpacked,
no position predicts a sample's first token either). Row padding gets its own positions
0..k, so it forms a separate segment, and labels -100.

Every batch also carries ``use_cache=False`` (a Python bool, not a tensor): with the model's
default use_cache=True transformers creates a cache even in a training forward, and with a
cache present it skips the packed-sequence detection, so attention would leak across samples.
Move batches with ``batch_to_device``, which leaves non-tensors alone. ``verify_packing(model)``
checks the whole path on the actual model and raises LorakitError where it is not exact.
"""

from __future__ import annotations

import random

import torch

from lorakit.data.templates import IGNORE_INDEX
from lorakit.errors import LorakitError


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Right-padded batch: input_ids, labels, attention_mask (B, T) and use_cache=False."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "use_cache": False}


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict:
    """Packed batch: one row per list of samples; input_ids, labels, position_ids (B, T),
    use_cache=False; no attention_mask (see the module docstring)."""
    flat_rows = []
    for samples in rows:
        ids, labels, positions = [], [], []
        for sample in samples:
            n = len(sample["input_ids"])
            ids += sample["input_ids"]
            labels += [IGNORE_INDEX] + list(sample["labels"][1:])  # nothing predicts a sample's first token
            positions += range(n)
        flat_rows.append((ids, labels, positions))
    width = max(len(ids) for ids, _, _ in flat_rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels, positions) in enumerate(flat_rows):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(row_labels, dtype=torch.long)
        position_ids[row, :n] = torch.tensor(positions, dtype=torch.long)
        position_ids[row, n:] = torch.arange(width - n)  # padding: a segment of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def pack_rows(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Greedy packing in the given order: indices into ``lengths``, grouped into rows of at
    most max_seq_len tokens (a longer sample gets a row of its own)."""
    rows, current, used = [], [], 0
    for index, length in enumerate(lengths):
        if current and used + length > max_seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        rows.append(current)
    return rows


def make_batches(samples: list[dict], batch_size: int, pad_token_id: int, packing: bool, max_seq_len: int,
                 shuffle: bool, seed: int) -> list[dict]:
    """Batches of ``samples``, deterministic given ``seed``.

    Without packing a batch holds ``batch_size`` samples; with packing it holds
    ``batch_size`` packed rows of up to ``max_seq_len`` tokens each.
    """
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    ordered = [samples[i] for i in order]
    if not packing:
        return [collate(ordered[i: i + batch_size], pad_token_id) for i in range(0, len(ordered), batch_size)]
    rows = [[ordered[i] for i in row] for row in pack_rows([len(s["input_ids"]) for s in ordered], max_seq_len)]
    return [collate_packed(rows[i: i + batch_size], pad_token_id) for i in range(0, len(rows), batch_size)]


def batch_to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (non-tensors such as use_cache unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _probe_logits(model, samples: list[list[dict]], device) -> torch.Tensor:
    batch = batch_to_device(collate_packed(samples, pad_token_id=0), device)
    batch.pop("labels")
    return model(**batch).logits


# How far packed and unpacked outputs may differ before packing counts as inexact. fp32: max
# log-prob difference (a correct path differs by ~1e-5 on the built-in model). Half precision
# (bf16 base, or a 4-bit base computing in bf16): logits are rounded to 8 mantissa bits, so the
# log-probs of unlikely tokens differ by up to ~0.5 between two correct layouts; there the check
# compares the distributions (total variation distance, dominated by the likely tokens): measured
# 0.03 for a correct path and 0.92 for one that attends across samples, on the built-in model.
_FP32_LOGPROB_TOL = 1e-3
_HALF_TV_TOL = 0.15


def _packing_error(packed: torch.Tensor, alone: torch.Tensor, half: bool) -> float:
    """The largest difference between rows of log-probs (..., T, V) in the measure ``half`` picks."""
    if half:
        return 0.5 * (packed.exp() - alone.exp()).abs().sum(-1).max().item()  # total variation
    return (packed - alone).abs().max().item()


def verify_packing(model) -> None:
    """Raise LorakitError unless packed batches give ``model`` the same outputs as unpacked
    ones: two rows [A, C] and [B, C] must give C the same log-probs as C alone, within the
    tolerance of the precision the model computes in (see ``_HALF_TV_TOL``).

    Costs one forward over a few dozen tokens; the model's train/eval mode is restored.
    """
    name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings
    generator = torch.Generator().manual_seed(0)
    a, b, c = ({"input_ids": torch.randint(0, vocab, (n,), generator=generator).tolist()} for n in (7, 7, 5))
    for s in (a, b, c):
        s["labels"] = s["input_ids"]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed_logits = _probe_logits(model, [[a, c], [b, c]], device)[:, 7:]
            alone_logits = _probe_logits(model, [[c]], device)
    except TypeError as err:
        raise LorakitError(f"data.packing is not supported for model type '{name}' ({err}); set data.packing: "
                           f"false") from None
    finally:
        model.train(was_training)
    # the logits' dtype is the precision the model computes in (a quantized base's compute dtype)
    half = packed_logits.dtype not in (torch.float32, torch.float64)
    packed, alone = (torch.log_softmax(t.float(), dim=-1) for t in (packed_logits, alone_logits))
    error = max(_packing_error(packed[0], packed[1], half), _packing_error(packed, alone, half))
    if error > (_HALF_TV_TOL if half else _FP32_LOGPROB_TOL):
        measure = "total variation distance" if half else "log-prob difference"
        raise LorakitError(f"data.packing is not exact for model type '{name}' (attention crosses sample "
                           f"boundaries or positions do not restart; {measure} {error:.3g}); "
                           f"set data.packing: false")
