"""Training objectives: what the loop minimises, as one small object it calls (``Objective``).

    sft              mean next-token loss over the labelled response tokens (SFT rows)
    dpo, ipo, simpo, orpo   pairwise preference losses (preference rows; ``pairwise.PairObjective``)
    kto              single answers marked desirable / undesirable (KTO rows; ``kto.KtoObjective``)

The math of each loss is in ``objectives.losses``. The loop never branches on the objective: per
optimizer step it asks ``totals(all micro-batches)`` for the step's normalisers (target tokens,
pairs, ...), ``prepare_step`` for anything computed over the whole step first (KTO's KL estimate),
then for each micro-batch ``loss(...)`` -> (its share of the step loss, figures summed for
metrics). Each share divides by the step's totals, so the shares of all micro-batches (and of
all processes) add up to the loss of one big batch, and gradient accumulation changes nothing.
``summarize(sums, totals)`` turns summed figures into the logged metrics (``loss`` first).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from lorakit.errors import LorakitError

Reduce = Callable[[dict], dict]  # sums a dict of floats over processes (identity in one process)


class Objective(Protocol):
    """name: train.objective. data_kind: the rows it trains on ("sft", "preference", "kto").
    bar_keys: metrics shown on the progress bar besides the loss. uses_reference: whether it
    compares against a reference model (DPO, IPO, KTO) or not (SFT, SimPO, ORPO)."""

    name: str
    data_kind: str
    bar_keys: tuple[str, ...]
    uses_reference: bool

    def totals(self, batches: list[dict]) -> dict[str, float]: ...

    def prepare_step(self, model, batches: list[dict], totals: dict, device, reduce: Reduce) -> dict: ...

    def loss(self, model, batch: dict, totals: dict, device) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarize(self, sums: dict, totals: dict, evaluation: bool = False) -> dict[str, float | None]: ...


def add_into(total: dict, part: dict) -> dict:
    """``total`` += ``part`` key by key (missing keys start at 0); returns ``total``."""
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value
    return total


def make_objective(train_args, reference=None) -> Objective:
    """The objective ``train_args.objective`` names, with its knobs; ``reference`` (a
    ``preference.Reference``) for the objectives that compare against one."""
    from lorakit.training.objectives.kto import KtoObjective
    from lorakit.training.objectives.pairwise import PairObjective
    from lorakit.training.objectives.sft import SftObjective

    name = train_args.objective
    if name == "sft":
        return SftObjective()
    if name == "kto":
        return KtoObjective(train_args.beta, train_args.desirable_weight, train_args.undesirable_weight, reference)
    if name in PairObjective.KINDS:
        return PairObjective(name, train_args.beta, train_args.label_smoothing, train_args.simpo_gamma,
                             train_args.cpo_alpha, reference)
    raise LorakitError(f"train.objective {name!r} is unknown")


_ROWS = {"sft": "conversations or prompt/completion rows", "preference": "{prompt, chosen, rejected} rows",
         "kto": "{prompt, completion, label} rows"}


def check_rows(objective: str, data_format: str, where: str) -> None:
    """The objective and the rows must fit: SFT rows for sft, pairs for dpo/ipo/orpo/simpo, KTO rows for kto."""
    needs = {"sft": "sft", "kto": "kto"}.get(objective, "preference")
    has = data_format if data_format in ("preference", "kto") else "sft"
    if needs != has:
        raise LorakitError(f"train.objective {objective} trains on {_ROWS[needs]}, but {where} has {data_format} "
                           f"rows; set train.objective or point data.train at such rows")


@torch.no_grad()
def evaluate_objective(objective: Objective, model, batches: list[dict], device, reduce: Reduce = dict) -> dict:
    """The objective's metrics over ``batches`` as one batch, model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    try:
        totals = reduce(objective.totals(batches))
        totals = objective.prepare_step(model, batches, totals, device, reduce)
        sums: dict = {}
        for batch in batches:
            add_into(sums, objective.loss(model, batch, totals, device)[1])
    finally:
        model.train(was_training)
    return objective.summarize(reduce(sums), totals, evaluation=True)
