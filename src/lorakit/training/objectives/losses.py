"""The preference losses as pure functions of per-sequence log-probabilities (fp32 tensors (B,)).

Notation: for pair i, π_c = log π_θ(y_c | x), π_r = log π_θ(y_r | x) summed over the answer's
tokens, π̄ = the same divided by the answer's token count |y|, ref_c / ref_r the reference
model's sums, β > 0, ε = label_smoothing, σ the logistic function.

    DPO   (Rafailov et al. 2023), conservative with ε (cDPO):
          h = β [(π_c - ref_c) - (π_r - ref_r)],   ℓ = -(1-ε) log σ(h) - ε log σ(-h)
    IPO   (Azar et al. 2023), on per-token log-ratios as TRL (confirmed with the IPO authors):
          h = (π_c - ref_c)/|y_c| - (π_r - ref_r)/|y_r|,   ℓ = (h - 1/(2β))²
    SimPO (Meng et al. 2024), reference-free, γ = simpo_gamma:
          h = β (π̄_c - π̄_r) - γ,   ℓ = -(1-ε) log σ(h) - ε log σ(-h)
    ORPO  (Hong et al. 2024), λ = β (TRL's name), odds(p) = p / (1 - p) on the mean token prob:
          log OR = (π̄_c - π̄_r) - (log(1 - e^π̄_c) - log(1 - e^π̄_r)),   ℓ = -β log σ(log OR)
          (plus the NLL term on the chosen answers, added by the objective)
    KTO   (Ethayarajh et al. 2024), z = max(0, mean KL estimate), detached:
          desirable:   ℓ = w_d (1 - σ(β (r - z))),   undesirable: ℓ = w_u (1 - σ(β (z - r))),
          r = log π_θ(y | x) - log π_ref(y | x)

Each returns per-example losses (B,); the objective averages them over the optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LN_HALF = -0.6931471805599453  # log(1/2): where log1mexp switches formula to avoid cancellation


def smoothed_logistic(h: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε) log σ(h) - ε log σ(-h): the logistic loss when a preference is flipped with probability ε."""
    loss = -F.logsigmoid(h) * (1 - label_smoothing)
    return loss - F.logsigmoid(-h) * label_smoothing if label_smoothing else loss


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    return smoothed_logistic(beta * (chosen_logratios - rejected_logratios), label_smoothing)


def ipo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_counts: torch.Tensor,
               rejected_counts: torch.Tensor, beta: float) -> torch.Tensor:
    h = chosen_logratios / chosen_counts.clamp(min=1) - rejected_logratios / rejected_counts.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def simpo_losses(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    # TRL's CPOTrainer writes β ((π̄_c - π̄_r) - γ/β): the same h
    return smoothed_logistic(beta * ((chosen_mean_logps - rejected_mean_logps) - gamma / beta), label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of log(1/2) (Mächler 2012)."""
    return torch.where(x < _LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """log OR(y_c, y_r) = log odds(π̄_c) - log odds(π̄_r), odds(p) = p / (1 - p)."""
    return (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))


def orpo_losses(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float) -> torch.Tensor:
    return -beta * F.logsigmoid(orpo_log_odds(chosen_mean_logps, rejected_mean_logps))


def kto_losses(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """(B,) losses of single answers; ``desirable`` (B,) bool, ``kl`` a detached scalar >= 0."""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, good, bad)
