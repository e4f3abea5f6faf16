"""Which micro-batches each optimizer step uses: a pure function of (samples, settings, step).

Epoch e shuffles the samples with seed ``seed + e`` (``lorakit.data.make_batches``; with
``group_by_length`` the same shuffle is grouped by length, still a pure function of the seed),
so the batches of any step can be rebuilt after a restart: resuming at step k just starts the
loop at k. ``packing`` is the resolved bool (``resolve_packing``), not the "auto" setting.
One optimizer step takes ``grad_accum × num_processes`` consecutive micro-batches of the
current epoch (fewer at the end of an epoch); process i takes every num_processes-th of them.
With several processes each epoch is cut to a multiple of num_processes micro-batches so that
every process runs the same number of forwards per step (needed for gradient all-reduce).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

from lorakit.data import make_batches
from lorakit.data.batching import plan_batches
from lorakit.data.preference import sample_length
from lorakit.training.evaluate import count_targets


@dataclass
class StepPlan:
    samples: list[dict]
    batch_size: int
    grad_accum: int
    pad_token_id: int
    packing: bool
    max_seq_len: int
    seed: int
    epochs: float = 1
    max_steps: int = 0
    num_processes: int = 1
    group_by_length: bool = False
    # how samples become batches: make_batches (SFT) or data.preference.make_preference_batches
    batcher: Callable[..., list[dict]] = make_batches
    _epochs: dict[int, list[dict]] = field(default_factory=dict, repr=False)
    _counts: dict[int, int] = field(default_factory=dict, repr=False)

    def epoch_batches(self, epoch: int) -> list[dict]:
        if epoch not in self._epochs:
            batches = self.batcher(self.samples, self.batch_size, self.pad_token_id, self.packing,
                                   self.max_seq_len, shuffle=True, seed=self.seed + epoch,
                                   group_by_length=self.group_by_length)
            keep = len(batches) - len(batches) % self.num_processes
            self._epochs = {epoch: batches[:keep]}  # keep one epoch in memory
            self._counts[epoch] = keep
        return self._epochs[epoch]

    @functools.cached_property
    def _lengths(self) -> list[int]:
        return [sample_length(s) for s in self.samples]

    @property
    def per_step(self) -> int:
        return self.grad_accum * self.num_processes

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch``, from the sample lengths alone (no tensors built):
        with packing the count can differ a little between epochs (other shuffles, other rows)."""
        if epoch not in self._counts:
            batches = len(plan_batches(self._lengths, self.batch_size, self.packing, self.max_seq_len, shuffle=True,
                                       seed=self.seed + epoch, group_by_length=self.group_by_length))
            self._counts[epoch] = batches - batches % self.num_processes
        return math.ceil(self._counts[epoch] / self.per_step)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of epoch 0 (every epoch has the same count unless packing reorders lengths)."""
        return self.steps_in_epoch(0)

    @property
    def total_steps(self) -> int:
        """max_steps, else the steps of the whole epochs plus the fraction of the next one."""
        if self.max_steps > 0:
            return self.max_steps
        whole, part = int(self.epochs), self.epochs - int(self.epochs)
        steps = sum(self.steps_in_epoch(epoch) for epoch in range(whole))
        return max(1, steps + math.ceil(self.steps_in_epoch(whole) * part))

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first step of that epoch) of global step ``step`` (0-based)."""
        epoch, start = 0, 0
        while step >= start + self.steps_in_epoch(epoch):
            start += self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, start

    def step_batches(self, step: int) -> list[dict]:
        """All micro-batches of global step ``step`` (every process's)."""
        epoch, start = self.position(step)
        offset = (step - start) * self.per_step
        return self.epoch_batches(epoch)[offset: offset + self.per_step]

    def process_batches(self, step: int, process_index: int) -> tuple[list[dict], int]:
        """(this process's micro-batches, target tokens of the whole step over all processes)."""
        batches = self.step_batches(step)
        return batches[process_index::self.num_processes], sum(count_targets(b) for b in batches)
