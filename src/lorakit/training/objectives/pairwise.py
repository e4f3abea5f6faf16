"""Pairwise preference objectives on batches of [chosen rows, rejected rows] (see data.preference).

One forward of the policy scores both answers of every pair; π (B,) sums fp32 log-probs over each
answer's labelled tokens (``logprobs``), π̄ = π / |y|. The per-pair losses are in
``objectives.losses``; the step loss is their mean over the step's pairs, plus for ORPO and for
SimPO with cpo_alpha > 0 a weighted NLL term on the chosen rows (a token mean over the step):

    dpo, ipo   mean_pairs ℓ                       (reference log-probs needed)
    simpo      mean_pairs ℓ + cpo_alpha · NLL(chosen answer tokens)             (TRL's CPOTrainer)
    orpo       mean_pairs ℓ + NLL(chosen prompt + answer tokens)                (TRL's ORPOTrainer
               scores the whole chosen sequence, prompt included; so does this objective)

Metrics with TRL's names, as means over pairs: rewards/chosen, rewards/rejected (β (π - π_ref)
for DPO / IPO; β π̄ for SimPO / ORPO, which have no reference), rewards/margins,
rewards/accuracies (share of pairs whose chosen reward is strictly larger), logps/chosen,
logps/rejected (π), logps/accuracies (share of pairs with π_c > π_r: the model itself prefers the
chosen answer, reference or not); plus nll_loss for ORPO / SimPO.
"""

from __future__ import annotations

import torch

from lorakit.data import batch_to_device
from lorakit.errors import LorakitError
from lorakit.training.logprobs import label_mask, token_logps
from lorakit.training.objectives import losses as L


class PairObjective:
    KINDS = ("dpo", "ipo", "simpo", "orpo")
    data_kind = "preference"
    bar_keys = ("rewards/accuracies", "rewards/margins")

    def __init__(self, name: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 cpo_alpha: float = 0.0, reference=None):
        self.name, self.beta, self.label_smoothing = name, beta, label_smoothing
        self.simpo_gamma, self.cpo_alpha = simpo_gamma, cpo_alpha
        self.uses_reference = name in ("dpo", "ipo")
        if self.uses_reference and reference is None:
            raise LorakitError(f"train.objective {name} needs a reference model")
        self.reference = reference
        # weight of the NLL term on the chosen rows, and whether it covers the prompt too
        self.nll_weight = {"orpo": 1.0, "simpo": cpo_alpha}.get(name, 0.0)
        self.nll_on_prompt = name == "orpo"

    # --- the step's normalisers ------------------------------------------------------------
    def _nll_mask(self, batch: dict) -> torch.Tensor:
        """(B, T-1) target positions of the chosen rows the NLL term averages over."""
        pairs = batch["input_ids"].shape[0] // 2
        if self.nll_on_prompt:  # every real (non-padding) token of the chosen sequence
            return batch["attention_mask"][:pairs, 1:].bool()
        return label_mask(batch["labels"][:pairs])

    def totals(self, batches: list[dict]) -> dict:
        totals = {"pairs": float(sum(b["input_ids"].shape[0] // 2 for b in batches))}
        if self.nll_weight:
            totals["nll_tokens"] = float(sum(int(self._nll_mask(b).sum()) for b in batches))
        return totals

    def prepare_step(self, model, batches, totals, device, reduce) -> dict:
        return totals

    # --- one micro-batch ---------------------------------------------------------------------
    def _reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:  # precomputed (precompute_ref_log_probs)
            return batch["ref_logps"]
        return self.reference.logps(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def _pair_losses(self, logps, counts, batch):
        """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,))."""
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        if self.uses_reference:
            ref = self._reference_logps(batch)
            chosen_ratio, rejected_ratio = chosen - ref[:pairs], rejected - ref[pairs:]
            if self.name == "dpo":
                losses = L.dpo_losses(chosen_ratio, rejected_ratio, self.beta, self.label_smoothing)
            else:
                losses = L.ipo_losses(chosen_ratio, rejected_ratio, counts[:pairs], counts[pairs:], self.beta)
            return losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        mean = logps / counts.clamp(min=1)
        if self.name == "simpo":
            losses = L.simpo_losses(mean[:pairs], mean[pairs:], self.beta, self.simpo_gamma, self.label_smoothing)
        else:
            losses = L.orpo_losses(mean[:pairs], mean[pairs:], self.beta)
        return losses, self.beta * mean[:pairs].detach(), self.beta * mean[pairs:].detach()

    def loss(self, model, batch: dict, totals: dict, device):
        batch = batch_to_device(batch, device)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        pairs = ids.shape[0] // 2
        keep = label_mask(batch["labels"])                                  # (2B, T-1) answer tokens
        scored = keep
        if self.nll_weight:
            nll_keep = torch.zeros_like(keep)
            nll_keep[:pairs] = self._nll_mask(batch)
            scored = keep | nll_keep
        per_token = token_logps(model, ids, attention, scored)             # (2B, T-1), one policy forward
        logps, counts = (per_token * keep).sum(1), keep.sum(1)             # (2B,)
        losses, chosen_rewards, rejected_rewards = self._pair_losses(logps, counts, batch)
        share = losses.sum() / totals["pairs"]
        figures = {"pair_loss_sum": float(losses.detach().sum())}
        if self.nll_weight:
            nll_sum = -(per_token[:pairs] * nll_keep[:pairs]).sum()
            share = share + self.nll_weight * nll_sum / totals["nll_tokens"]
            figures["nll_sum"] = float(nll_sum.detach())
        detached = logps.detach()
        figures.update({
            "rewards/chosen": float(chosen_rewards.sum()), "rewards/rejected": float(rejected_rewards.sum()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
            "logps/chosen": float(detached[:pairs].sum()), "logps/rejected": float(detached[pairs:].sum()),
            "logps/accuracies": float((detached[:pairs] > detached[pairs:]).sum()),
        })
        return share, figures

    def summarize(self, sums: dict, totals: dict, evaluation: bool = False) -> dict:
        pairs = max(totals["pairs"], 1)
        out = {"loss": sums.get("pair_loss_sum", 0.0) / pairs}
        if self.nll_weight:
            nll = sums.get("nll_sum", 0.0) / max(totals["nll_tokens"], 1)
            out["loss"] += self.nll_weight * nll
            out["nll_loss"] = nll
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "logps/accuracies"):
            out[key] = sums.get(key, 0.0) / pairs
        return out
