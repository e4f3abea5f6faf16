"""KTO (Ethayarajh et al. 2024) on batches of single answers marked desirable or not.

For each answer r = log π_θ(y|x) - log π_ref(y|x) (fp32 sums over its labelled tokens). The
reference point z estimates KL(π_θ || π_ref) on mismatched pairs (x_i, y_{i-1}) (see
data.preference), without gradients, over the whole optimizer step:

    z = max(0, mean_i [log π_θ(y_{i-1} | x_i) - log π_ref(y_{i-1} | x_i)])

    loss = mean over the step's answers of  w_d (1 - σ(β (r - z)))   (desirable)
                                         or  w_u (1 - σ(β (z - r)))   (undesirable)

TRL's KTOTrainer takes z per micro-batch; here z is the step's, so gradient accumulation gives
the loss of one big batch (the two agree when a step is one micro-batch). Metrics (TRL's names):
kl, rewards/chosen and rewards/rejected (mean β r over desirable / undesirable answers),
rewards/margins (their difference), logps/chosen, logps/rejected, and rewards/accuracies: the
share of answers whose reward has the sign of its label (KTO has no pairs to compare).
"""

from __future__ import annotations

import torch

from lorakit.data import batch_to_device
from lorakit.errors import LorakitError
from lorakit.training.logprobs import sequence_logps
from lorakit.training.objectives import losses as L


class KtoObjective:
    name = "kto"
    data_kind = "kto"
    bar_keys = ("rewards/margins", "kl")
    uses_reference = True

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reference=None):
        if reference is None:
            raise LorakitError("train.objective kto needs a reference model")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference = reference

    def totals(self, batches: list[dict]) -> dict:
        desirable = sum(int(b["desirable"].sum()) for b in batches)
        answers = sum(b["input_ids"].shape[0] for b in batches)
        return {"answers": float(answers), "desirable": float(desirable), "undesirable": float(answers - desirable)}

    @torch.no_grad()
    def prepare_step(self, model, batches: list[dict], totals: dict, device, reduce) -> dict:
        """The step's KL estimate z (see module docstring), over every process's micro-batches."""
        kl_sum, count = 0.0, 0
        for batch in batches:
            batch = batch_to_device(batch, device)
            policy, _ = sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
            if "ref_kl_logps" in batch:
                ref = batch["ref_kl_logps"]
            else:
                ref = self.reference.logps(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
            kl_sum += float((policy - ref).sum())
            count += policy.shape[0]
        summed = reduce({"kl_sum": kl_sum, "kl_count": float(count)})
        kl = max(summed["kl_sum"] / max(summed["kl_count"], 1.0), 0.0)
        # kl_weight: z x answers, so that the steps of a logging window average z by their answers
        return dict(totals, kl=kl, kl_weight=kl * totals["answers"])

    def loss(self, model, batch: dict, totals: dict, device):
        batch = batch_to_device(batch, device)
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B,)
        ref = batch["ref_logps"] if "ref_logps" in batch else self.reference.logps(
            batch["input_ids"], batch["attention_mask"], batch["labels"])
        ratios, desirable = logps - ref, batch["desirable"]
        kl = torch.tensor(totals["kl"], dtype=torch.float32, device=logps.device)
        losses = L.kto_losses(ratios, desirable, kl, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards, detached = self.beta * ratios.detach(), logps.detach()
        figures = {
            "loss_sum": float(losses.detach().sum()),
            "rewards/chosen": float(rewards[desirable].sum()), "rewards/rejected": float(rewards[~desirable].sum()),
            "rewards/accuracies": float(((rewards > 0) == desirable).sum()),
            "logps/chosen": float(detached[desirable].sum()), "logps/rejected": float(detached[~desirable].sum()),
        }
        return losses.sum() / totals["answers"], figures

    def summarize(self, sums: dict, totals: dict, evaluation: bool = False) -> dict:
        good, bad = totals["desirable"], totals["undesirable"]
        chosen = sums.get("rewards/chosen", 0.0) / good if good else None
        rejected = sums.get("rewards/rejected", 0.0) / bad if bad else None
        answers = max(totals["answers"], 1)
        return {"loss": sums.get("loss_sum", 0.0) / answers, "kl": totals.get("kl_weight", 0.0) / answers,
                "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": None if chosen is None or rejected is None else chosen - rejected,
                "rewards/accuracies": sums.get("rewards/accuracies", 0.0) / max(totals["answers"], 1),
                "logps/chosen": sums.get("logps/chosen", 0.0) / good if good else None,
                "logps/rejected": sums.get("logps/rejected", 0.0) / bad if bad else None}
