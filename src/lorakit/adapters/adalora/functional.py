"""Pure AdaLoRA math shared by the layer, the rank allocator and offline tools.

AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning")
writes the update of a frozen W (out, in) in SVD form

    ΔW = P Λ Q · alpha / (r₀ + ε),   P = lora_B: (out, r), Λ = diag(lora_E): lora_E (r, 1),
                                     Q = lora_A: (r, in),  r₀ = init_r (``ranknum``), ε = 1e-5,

and prunes the singular values Λ whose triplet (P[:, i], λ_i, Q[i, :]) matters least.
ε and the division by the *initial* rank are peft's, kept so that numbers match peft exactly.
"""

from __future__ import annotations

import torch

RANKNUM_EPS = 1e-5  # peft adds this to ranknum before dividing


def svd_scale(scaling: float, ranknum: float) -> float:
    """The scalar in front of P Λ Q: alpha / (r₀ + ε)."""
    return scaling / (ranknum + RANKNUM_EPS)


def svd_delta_weight(lora_A: torch.Tensor, lora_E: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     ranknum: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = P (Λ ⊙ Q) · alpha / (r₀ + ε), shape (out, in) ((in, out) for Conv1D); fp32 at least."""
    compute_dtype = torch.promote_types(lora_A.dtype, torch.float32)
    scaled_q = lora_A.to(compute_dtype) * lora_E.to(compute_dtype)  # (r, in): row i times λ_i
    delta = (lora_B.to(compute_dtype) @ scaled_q) * svd_scale(scaling, ranknum)  # (out, in)
    return delta.T if fan_in_fan_out else delta


def orthogonality_penalty(lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor]) -> torch.Tensor:
    """R(P, Q) = mean over all matrices of ||Q Qᵀ − I||_F (Q: (r, in)) and ||PᵀP − I||_F (P: (out, r)).

    The paper's regulariser keeps P and Q near-orthogonal so Λ behaves like singular values;
    peft averages the Frobenius norms over every P and Q, which this reproduces."""
    terms = []
    for matrix, gram in [(A, A @ A.T) for A in lora_As] + [(B, B.T @ B) for B in lora_Bs]:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)  # (r, r)
        terms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(rank budget b(t), whether to re-mask at this step).

    b(t) = b₀                                        for t <= tinit (warm-up)
         = b_T + (b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³   (cubic decrease, floored)
         = b_T                                       for t > T − tfinal (final fine-tuning)
    Masks are recomputed every ``deltaT`` steps while decreasing, and at every final step."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining ** 3 + target_budget)
    return budget, step % deltaT == 0


def update_importance(param: torch.Tensor, grad: torch.Tensor, sensitivity: torch.Tensor,
                      uncertainty: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the paper's smoothed importance for every entry of a parameter:

        I = |θ ⊙ ∇θ|,   Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|

    returns the new (Ī, Ū); the entry's score is Ī ⊙ Ū."""
    instant = (param * grad).abs()
    sensitivity = beta1 * sensitivity + (1 - beta1) * instant
    uncertainty = beta2 * uncertainty + (1 - beta2) * (instant - sensitivity).abs()
    return sensitivity, uncertainty


def triplet_scores(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """Importance of each singular triplet i (r,): S(λ_i) + mean_j S(Q_ij) + mean_k S(P_ki).

    score_A: (r, in), score_E: (r, 1), score_B: (out, r) — entry scores Ī ⊙ Ū."""
    vectors = score_A.mean(dim=1) + score_B.mean(dim=0)  # (r,)
    return score_E.view(-1) + vectors


def budget_threshold(scores: list[torch.Tensor], n_to_prune: int) -> float | None:
    """The n-th smallest triplet score over all matrices; triplets scoring <= it are pruned.
    None when nothing is to be pruned."""
    if n_to_prune <= 0:
        return None
    return torch.kthvalue(torch.cat([s.view(-1) for s in scores]), k=n_to_prune).values.item()
