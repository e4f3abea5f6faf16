"""StepPlan with length grouping: the batches of step k are rebuilt identically by a fresh plan
(what resuming after a restart relies on), in every epoch, packed or not."""

from __future__ import annotations

import random

import pytest
import torch

from lorakit.data import IGNORE_INDEX, make_batches
from lorakit.training.plan import StepPlan


def _samples(count=90, seed=2) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        ids = [rng.randint(3, 100) for _ in range(rng.choice([rng.randint(4, 20), rng.randint(20, 60)]))]
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return samples


def _plan(samples, packing, group=True, **kw) -> StepPlan:
    settings = dict(batch_size=3, grad_accum=2, pad_token_id=0, packing=packing, max_seq_len=64, seed=11,
                    epochs=3, group_by_length=group)
    return StepPlan(samples, **{**settings, **kw})


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x if k != "use_cache")
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("packing", [False, True])
def test_fresh_plan_rebuilds_the_batches_of_any_step(packing):
    samples = _samples()
    running = _plan(samples, packing)
    total = running.total_steps
    assert running.position(total - 1)[0] == 2  # three epochs
    reference = [running.step_batches(step) for step in range(total)]
    for step in (0, 1, total // 2, total - 1):  # a restart at step k: a new plan asked for step k first
        assert _equal(_plan(samples, packing).step_batches(step), reference[step])


@pytest.mark.parametrize("packing", [False, True])
def test_plan_passes_grouping_through(packing):
    samples = _samples()
    grouped, plain = _plan(samples, packing), _plan(samples, packing, group=False)
    for epoch in range(2):
        assert _equal(grouped.epoch_batches(epoch), make_batches(samples, 3, 0, packing, 64, shuffle=True,
                                                                 seed=11 + epoch, group_by_length=True))
    assert not _equal(grouped.epoch_batches(0), plain.epoch_batches(0))
    # the default (a StepPlan built without the new field) keeps the old batch order
    default = StepPlan(samples, 3, 2, 0, packing, 64, 11, 3)
    assert default.group_by_length is False and _equal(default.epoch_batches(0), plain.epoch_batches(0))
