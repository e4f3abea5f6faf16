"""Length grouping (data.group_by_length) and first-fit-decreasing packing: every sample once per
epoch, a pure function of the seed, measurably less padding and no more rows than before; and the
data.packing / data.group_by_length settings."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from lorakit.config import load_config
from lorakit.data import IGNORE_INDEX, DataConfig, make_batches
from lorakit.data.batching import pack_rows, pack_rows_ffd, padding_tokens, plan_batches
from lorakit.errors import LorakitError

PAD = -1  # no sample uses it, so padding is told apart from sample tokens
MAX_SEQ_LEN = 128


def _lengths(count=160, seed=1) -> list[int]:
    """A skewed mix like instruction data: mostly short samples, some medium, a few long."""
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 30)] * 6 + [rng.randint(30, 80)] * 3 + [rng.randint(80, 120)])
            for _ in range(count)]


def _samples(lengths: list[int]) -> list[dict]:
    """Sample i is the token i repeated: the batches show which samples they hold, and how much."""
    return [{"input_ids": [i] * n, "labels": [IGNORE_INDEX] + [i] * (n - 1)} for i, n in enumerate(lengths)]


def _tokens(batches: list[dict]) -> Counter:
    return Counter(t for b in batches for t in b["input_ids"].flatten().tolist() if t != PAD)


def _batches(samples, packing, seed=0, group=True, batch_size=4, shuffle=True):
    return make_batches(samples, batch_size, PAD, packing, MAX_SEQ_LEN, shuffle=shuffle, seed=seed,
                        group_by_length=group)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if k != "use_cache")
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("group", [False, True])
def test_every_sample_exactly_once_per_epoch(packing, group):
    lengths = _lengths()
    samples = _samples(lengths)
    for seed in range(3):
        batches = _batches(samples, packing, seed, group)
        assert _tokens(batches) == Counter({i: n for i, n in enumerate(lengths)})  # whole, once
        for batch in batches:
            assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= MAX_SEQ_LEN
            labelled = batch["labels"] != IGNORE_INDEX
            assert (batch["labels"][labelled] == batch["input_ids"][labelled]).all()
        if not packing:
            assert len(batches) == -(-len(samples) // 4)


@pytest.mark.parametrize("packing", [False, True])
def test_grouped_order_is_a_function_of_the_seed(packing):
    samples = _samples(_lengths())
    first = _batches(samples, packing, seed=3)
    assert _same(first, _batches(samples, packing, seed=3))  # a fresh call, as after a restart
    assert not _same(first, _batches(samples, packing, seed=4))
    # the order does not depend on anything but lengths, seed and settings
    assert plan_batches(_lengths(), 4, packing, MAX_SEQ_LEN, True, 3, True) == \
        plan_batches(list(_lengths()), 4, packing, MAX_SEQ_LEN, True, 3, True)


def test_grouped_unpacked_batches_pad_much_less():
    lengths = _lengths()
    samples = _samples(lengths)
    for seed in range(3):
        plain = sum(int((b["attention_mask"] == 0).sum()) for b in _batches(samples, False, seed, group=False))
        grouped = sum(int((b["attention_mask"] == 0).sum()) for b in _batches(samples, False, seed))
        assert grouped < 0.25 * plain, (seed, plain, grouped)


def test_grouped_packing_uses_fewer_rows_and_pads_less():
    lengths = _lengths()
    samples = _samples(lengths)
    for seed in range(3):
        plain, grouped = _batches(samples, True, seed, group=False), _batches(samples, True, seed)
        rows = [sum(b["input_ids"].shape[0] for b in batches) for batches in (plain, grouped)]
        padding = [sum(int((b["input_ids"] == PAD).sum()) for b in batches) for batches in (plain, grouped)]
        assert rows[1] < rows[0] and padding[1] < 0.5 * padding[0], (seed, rows, padding)
        assert rows[1] <= -(-sum(lengths) // MAX_SEQ_LEN) + 2  # within 2 rows of the fewest possible


def test_ffd_packing_uses_no_more_rows_than_greedy():
    for seed in range(5):
        lengths = _lengths(seed=seed)
        random.Random(seed).shuffle(lengths)
        greedy, ffd = pack_rows(lengths, MAX_SEQ_LEN), pack_rows_ffd(lengths, MAX_SEQ_LEN)
        assert len(ffd) < len(greedy)
        assert sorted(i for row in ffd for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= MAX_SEQ_LEN for row in ffd)
    assert pack_rows_ffd([200, 10, 130, 5], MAX_SEQ_LEN) == [[0], [2], [1, 3]]  # too long: a row of its own


def test_longest_batch_goes_first():
    lengths = _lengths()
    for packing in (False, True):
        for seed in range(4):
            plan = plan_batches(lengths, 4, packing, MAX_SEQ_LEN, True, seed, True)
            widths = [max(sum(lengths[i] for i in row) for row in batch) for batch in plan]
            assert widths[0] == max(widths)


def test_packed_batches_hold_about_batch_size_samples():
    """Packing saves padding, not steps: each packed batch holds whole rows adding up to about
    batch_size samples, so an epoch has about as many steps as unpacked."""
    lengths = _lengths()
    for group in (False, True):
        plan = plan_batches(lengths, 6, True, MAX_SEQ_LEN, True, 1, group)
        counts = [sum(len(row) for row in batch) for batch in plan]
        assert sum(counts) == len(lengths)
        widest = max(len(row) for batch in plan for row in batch)
        assert all(abs(count - 6) <= widest / 2 for count in counts[:-1])
        unpacked = plan_batches(lengths, 6, False, MAX_SEQ_LEN, True, 1, group)
        assert abs(len(plan) - len(unpacked)) <= 0.15 * len(unpacked)


def test_grouping_off_or_unshuffled_keeps_the_old_layout():
    lengths = _lengths()
    order = list(range(len(lengths)))
    random.Random(5).shuffle(order)
    assert plan_batches(lengths, 4, False, MAX_SEQ_LEN, True, 5) == [[[i] for i in order[k: k + 4]]
                                                                     for k in range(0, len(order), 4)]
    rows = [[order[p] for p in row] for row in pack_rows([lengths[i] for i in order], MAX_SEQ_LEN)]
    flat = [row for batch in plan_batches(lengths, 4, True, MAX_SEQ_LEN, True, 5) for row in batch]
    assert flat == rows  # greedy rows in shuffled order, batched by sample count
    for packing in (False, True):  # evaluation batches (no shuffle) are never regrouped
        assert plan_batches(lengths, 4, packing, MAX_SEQ_LEN, False, 0, True) == \
            plan_batches(lengths, 4, packing, MAX_SEQ_LEN, False, 0, False)


def test_padding_tokens_counts_what_collate_pads():
    lengths = _lengths(count=40)
    plan = plan_batches(lengths, 4, False, MAX_SEQ_LEN, True, 0, False)
    padded = sum(int((b["attention_mask"] == 0).sum()) for b in _batches(_samples(lengths), False, group=False))
    assert padding_tokens(plan, lengths) == padded > 0


def test_batching_needs_a_resolved_packing_bool():
    with pytest.raises(LorakitError, match="packing must be resolved to true or false.*'auto'.*resolve_packing"):
        _batches(_samples([5, 6]), "auto")


def test_data_config_packing_and_grouping_settings():
    default = DataConfig()
    assert default.packing == "auto" and default.group_by_length is True
    for value in (True, False, "auto"):
        assert DataConfig(packing=value).packing == value
    for bad in ("yes", 1, None):
        with pytest.raises(LorakitError, match=r"^data.packing must be true, false or auto, got"):
            DataConfig(packing=bad)
    with pytest.raises(LorakitError, match="data.group_by_length must be true or false, got 'no'"):
        DataConfig(group_by_length="no")
    config = load_config(None, ["data.packing=auto", "data.group_by_length=false"])
    assert config.data.packing == "auto" and config.data.group_by_length is False
    assert load_config(None, ["data.packing=true"]).data.packing is True
    with pytest.raises(LorakitError, match="data.packing must be true, false or auto, got 'maybe'"):
        load_config(None, ["data.packing=maybe"])
