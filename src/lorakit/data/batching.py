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
checks the whole path on the actual model and raises LorakitError where it is not exact;
``resolve_packing(setting, model)`` turns ``data.packing`` (true, false or "auto") into the
bool ``make_batches`` takes.

Length grouping (``group_by_length``, used when shuffling), as transformers' Trainer
(``get_length_grouped_indices``): the seeded shuffle is cut into pools of
``mult × batch_size`` samples, mult = min(50, n // (4 · batch_size)) (at least 1, so a small
data set still has about 4 pools and some randomness); each pool is sorted by length,
longest first, and cut into batches, so a batch holds samples of similar length and pads
little. With packing the same pools are packed first-fit decreasing, which leaves fewer and
fuller rows than greedy packing in shuffled order, and rows are batched so that a batch holds
about ``batch_size`` samples (whole rows; see ``make_batches``). Either way the batch with the longest row
goes first, so an out-of-memory shows at step 1, and the result is a pure function of
(sample lengths, seed, settings): a restarted run rebuilds the same batches.
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


def pack_rows_ffd(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """First-fit decreasing: indices into ``lengths``, longest first (ties in index order), each
    into the first row with room for it, rows of at most max_seq_len tokens (a longer sample
    gets a row of its own). At most 11/9 · OPT + 6/9 rows (Dósa 2007); on real length mixes
    fewer rows than ``pack_rows`` leaves on a shuffled order."""
    smallest = min(lengths, default=0)
    rows, room, open_rows = [], [], []  # open_rows: rows (in creation order) the smallest sample fits
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[index]
        for k, row in enumerate(open_rows):
            if n <= room[row]:
                rows[row].append(index)
                room[row] -= n
                if room[row] < smallest:
                    del open_rows[k]
                break
        else:
            rows.append([index])
            room.append(max_seq_len - n)
            if room[-1] >= smallest:
                open_rows.append(len(rows) - 1)
    return rows


MEGABATCH_MULT = 50  # transformers' default: pools of up to 50 batches


def _pools(order: list[int], sizes: list[int], batch_units: int) -> list[list[int]]:
    """``order`` cut into consecutive pools of at most mult × batch_units units (``sizes[i]``
    units per index; a pool holds at least one index), mult = min(50, total // (4 · batch_units))
    and at least 1, as transformers' ``get_length_grouped_indices``."""
    mult = max(1, min(MEGABATCH_MULT, sum(sizes[i] for i in order) // (4 * batch_units)))
    return [[order[p] for p in pool] for pool in pack_rows([sizes[i] for i in order], mult * batch_units)]


def _longest_first(batches: list[list[list[int]]], lengths: list[int]) -> list[list[list[int]]]:
    """``batches`` with the one whose widest row is longest (the first such) swapped to the front."""
    widths = [max(sum(lengths[i] for i in row) for row in batch) for batch in batches]
    widest = widths.index(max(widths))
    batches[0], batches[widest] = batches[widest], batches[0]
    return batches


def _packed_pool_rows(pools: list[list[int]], lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """First-fit-decreasing rows of each pool, fullest first. The least full row of a pool is
    carried into the next pool and packed again, so only the last pool leaves a part-filled row
    (a row short of max_seq_len per pool would cost more than greedy packing saves)."""
    rows, carry = [], []
    for n, pool in enumerate(pools):
        pool = carry + pool
        packed = [[pool[p] for p in row] for row in pack_rows_ffd([lengths[i] for i in pool], max_seq_len)]
        packed.sort(key=lambda row: -sum(lengths[i] for i in row))
        carry = packed.pop() if n < len(pools) - 1 else []
        rows += packed
    return rows


def _grouped_rows(order: list[int], lengths: list[int], batch_size: int, packing: bool,
                  max_seq_len: int) -> list[list[int]]:
    """Rows of grouped batches: per pool of ``order``, the samples longest first (unpacked, one
    per row), or the pool's first-fit-decreasing rows (packed)."""
    pools = _pools(order, [1] * len(lengths), batch_size)
    if not packing:
        return [[i] for pool in pools for i in sorted(pool, key=lambda i: -lengths[i])]
    return _packed_pool_rows(pools, lengths, max_seq_len)


def _batches_of_samples(rows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive rows grouped so that each batch holds about ``batch_size`` samples: a row
    joins the batch unless that would overshoot batch_size by more than stopping short of it
    undershoots. So a packed batch carries about as many samples as an unpacked one, an epoch
    has about the same number of optimizer steps, and the lr schedule keeps its meaning."""
    batches, current, count = [], [], 0
    for row in rows:
        if current and count + len(row) - batch_size > batch_size - count:
            batches.append(current)
            current, count = [], 0
        current.append(row)
        count += len(row)
        if count >= batch_size:
            batches.append(current)
            current, count = [], 0
    if current:
        batches.append(current)
    return batches


def plan_batches(lengths: list[int], batch_size: int, packing: bool, max_seq_len: int, shuffle: bool, seed: int,
                 group_by_length: bool = False) -> list[list[list[int]]]:
    """Which samples go where, from their lengths alone: batches of rows of sample indices
    (a row holds one sample without packing). Every index appears exactly once.

    Order: ``random.Random(seed).shuffle`` when ``shuffle``, else as given. Grouping (only with
    ``shuffle``; see the module docstring) sorts within pools of the shuffle, packs them
    first-fit decreasing with packing, and puts the longest batch first; without it rows come
    in shuffled order, packed greedily (the layout of lorakit before grouping, kept exactly).
    """
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(packing, bool):
        raise LorakitError(f"packing must be resolved to true or false before batching, got {packing!r} "
                           f"(use resolve_packing(setting, model))")
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if group_by_length and shuffle and order:
        rows = _grouped_rows(order, lengths, batch_size, packing, max_seq_len)
    elif packing:
        rows = [[order[p] for p in row] for row in pack_rows([lengths[i] for i in order], max_seq_len)]
    else:
        rows = [[i] for i in order]
    batches = _batches_of_samples(rows, batch_size)
    return _longest_first(batches, lengths) if group_by_length and shuffle and batches else batches


def make_batches(samples: list[dict], batch_size: int, pad_token_id: int, packing: bool, max_seq_len: int,
                 shuffle: bool, seed: int, group_by_length: bool = False) -> list[dict]:
    """Batches of ``samples``, a pure function of the samples, ``seed`` and the settings.

    Without packing a batch holds ``batch_size`` samples; with packing it holds whole packed rows
    of up to ``max_seq_len`` tokens that add up to about ``batch_size`` samples (whole rows:
    a batch may hold a few more or fewer). Packing so saves padding, not optimizer steps: an epoch has about as many
    steps as unpacked, and lr and schedule settings mean the same with and without it. ``packing`` is a bool
    (``resolve_packing`` decides "auto"); ``group_by_length`` groups similar lengths when
    ``shuffle`` is on (``plan_batches``).
    """
    lengths = [len(s["input_ids"]) for s in samples]
    plan = plan_batches(lengths, batch_size, packing, max_seq_len, shuffle, seed, group_by_length)
    if not packing:
        return [collate([samples[row[0]] for row in batch], pad_token_id) for batch in plan]
    return [collate_packed([[samples[i] for i in row] for row in batch], pad_token_id) for batch in plan]


def padding_tokens(plan: list[list[list[int]]], lengths: list[int]) -> int:
    """Padding positions of the batches of ``plan`` (``plan_batches``): per batch,
    rows × widest row − tokens."""
    total = 0
    for batch in plan:
        rows = [sum(lengths[i] for i in row) for row in batch]
        total += len(rows) * max(rows) - sum(rows)
    return total


def batch_to_device(batch: dict, device) -> dict:
    """The batch with its tensors on ``device`` (non-tensors such as use_cache unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_packing(setting: bool | str, model) -> bool:
    """``data.packing`` as the bool ``make_batches`` takes: false as given; true after
    ``verify_packing(model)`` passes (else its one-line error); "auto" is true where the check
    passes and false (no error) where it does not. Adapters act per token, so the base model
    answers for the adapted one."""
    if setting is True:
        verify_packing(model)
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise LorakitError(f"data.packing must be true, false or auto, got {setting!r}")
    try:
        verify_packing(model)
    except LorakitError:
        return False
    return True


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
