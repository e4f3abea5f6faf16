"""SFT: the mean next-token cross-entropy over every labelled token of the step.

    loss = Σ_tokens CE / N_step,   N_step = labelled target tokens of all micro-batches

Each micro-batch contributes its token-loss sum / N_step (``evaluate.batch_loss_sum``: the head
and loss only on labelled positions where the model allows it).
"""

from __future__ import annotations

import math

from lorakit.training.evaluate import batch_loss_sum, count_targets


class SftObjective:
    name = "sft"
    data_kind = "sft"
    bar_keys = ()
    uses_reference = False

    def totals(self, batches: list[dict]) -> dict:
        return {"targets": float(sum(count_targets(b) for b in batches))}

    def prepare_step(self, model, batches, totals, device, reduce) -> dict:
        return totals

    def loss(self, model, batch: dict, totals: dict, device):
        loss_sum, _ = batch_loss_sum(model, batch, device)
        return loss_sum / totals["targets"], {"loss_sum": float(loss_sum.detach())}

    def summarize(self, sums: dict, totals: dict, evaluation: bool = False) -> dict:
        loss = sums.get("loss_sum", 0.0) / max(totals["targets"], 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))} if evaluation else {"loss": loss}
