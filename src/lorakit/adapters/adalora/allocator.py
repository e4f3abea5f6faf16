"""AdaLoRA's rank allocator: which singular triplets to keep, as an explicit training step.

The training loop calls ``update_and_allocate(global_step)`` after ``optimizer.step()`` and
before ``zero_grad()`` (peft's convention; ``LoraModel.update_and_allocate`` forwards here):

    t <  T − tfinal : update the smoothed importance of every entry of P, Λ, Q from its
                      gradient, then (every deltaT steps after tinit) zero the λ_i of the
                      least important triplets so that b(t) triplets remain (cubic schedule)
    t == T − tfinal : final mask to the target budget b_T = target_r × (adapted matrices);
                      the result is ``config.rank_pattern``
    t >  T − tfinal : re-apply that mask (the optimizer moves pruned λ_i off zero)

Importance of triplet i (Zhang et al. 2023, eq. 7-9): S_i = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)
with s = Ī ⊙ Ū, the EMA of |θ·∇θ| (β1) times the EMA of its deviation (β2). Triplets scoring
at or below the (b₀ − b(t))-th smallest score over all matrices are pruned, as in peft.
"""

from __future__ import annotations

import torch

from lorakit.adapters.adalora.functional import (budget_schedule, budget_threshold, orthogonality_penalty,
                                                 triplet_scores, update_importance)
from lorakit._file_keys import FILE_PREFIX
from lorakit.errors import LorakitError

_E_SUFFIX = ".lora_E"


def rank_pattern_key(module_name: str) -> str:
    """The rank_pattern key of a module, as peft writes it: "<module path>.lora_E"."""
    return module_name + _E_SUFFIX


def kept_triplets(rank_pattern: dict[str, list[bool]] | None, module_name: str) -> list[bool] | None:
    """The kept-triplet mask rank_pattern records for ``module_name`` (None: keep all)."""
    if not rank_pattern:
        return None
    return rank_pattern.get(rank_pattern_key(module_name))


def prune_tensors_by_rank_pattern(tensors: dict[str, torch.Tensor],
                                  rank_pattern: dict[str, list[bool]] | None) -> dict[str, torch.Tensor]:
    """Drop pruned triplets from file tensors (keys "base_model.model.<module>.lora_{A,E,B}"):
    Q and Λ lose rows, P loses columns. Tensors already at the kept rank pass through."""
    if not rank_pattern:
        return tensors
    out = dict(tensors)
    for key, mask in rank_pattern.items():
        module = FILE_PREFIX + key.removesuffix(_E_SUFFIX)
        kept = sum(mask)
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            file_key = f"{module}.{name}"
            if file_key not in out:
                raise LorakitError(f"rank_pattern key '{key}' names no adapted module (no tensor '{file_key}')")
            tensor = out[file_key]
            if tensor.shape[dim] != kept:
                index = torch.tensor(mask, dtype=torch.bool, device=tensor.device)
                out[file_key] = tensor[index] if dim == 0 else tensor[:, index]
    return out


class RankAllocator:
    """Budget schedule, importance tracking and masking for one trainable AdaLoRA adapter.

    layers: {module name: AdaLoraLayer}; only those holding ``adapter_name`` are used.
    Writes ``config.rank_pattern`` whenever it masks. An adapter loaded already pruned (its
    matrices hold fewer than init_r triplets) keeps its ranks: allocation is then a no-op and
    only the orthogonality penalty applies."""

    def __init__(self, config, layers: dict, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.layers = {n: m for n, m in layers.items() if adapter_name in m.lora_A}
        self.init_budget = sum(m.lora_A[adapter_name].shape[0] for m in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.already_pruned = any(m.lora_A[adapter_name].shape[0] != config.init_r for m in self.layers.values())
        self.reset_importance()

    def reset_importance(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}  # Ī per (module, "lora_A"/"lora_E"/"lora_B")
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # Ū, same keys

    def _params(self):
        for module_name, layer in self.layers.items():
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield (module_name, kind), getattr(layer, kind)[self.adapter_name]

    # --- the two hooks LoraModel calls ---------------------------------------------------
    def extra_loss(self) -> torch.Tensor:
        """orth_reg_weight · R(P, Q), added to the model's loss in every training-mode forward with labels."""
        a = self.adapter_name
        penalty = orthogonality_penalty([m.lora_A[a] for m in self.layers.values()],
                                        [m.lora_B[a] for m in self.layers.values()])
        return self.config.orth_reg_weight * penalty

    def update_and_allocate(self, global_step: int) -> None:
        """One allocation step (see module docstring); call after optimizer.step()."""
        final_step = self.config.total_step - self.config.tfinal
        if self.already_pruned:
            return
        if global_step < final_step:
            self.update_importance()
            budget, mask_now = self.budget(global_step)
            if mask_now:
                self.config.rank_pattern = self.mask_to_budget(budget)
        elif global_step == final_step:
            if not self.sensitivity:
                raise LorakitError(f"AdaLoRA: final rank allocation at step {global_step} has no importance scores; "
                                   "call update_and_allocate(step) at every training step")
            self.config.rank_pattern = self.mask_to_budget(self.target_budget)
            self.reset_importance()
        elif self.config.rank_pattern is not None:
            self.apply_rank_pattern(self.config.rank_pattern)

    # --- checkpoints: what an exact resume needs --------------------------------------------
    def state_dict(self) -> dict:
        """The smoothed importance (Ī, Ū per parameter) and the current rank_pattern."""
        def flat(table):
            return {f"{module}|{kind}": t.detach().clone() for (module, kind), t in table.items()}

        return {"sensitivity": flat(self.sensitivity), "uncertainty": flat(self.uncertainty),
                "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        def nested(table):
            return {tuple(key.split("|", 1)): t for key, t in table.items()}

        self.sensitivity, self.uncertainty = nested(state["sensitivity"]), nested(state["uncertainty"])
        self.config.rank_pattern = state["rank_pattern"]

    # --- the steps ---------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal, c.total_step, c.deltaT)

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty."""
        params = list(self._params())
        if all(p.grad is None for _, p in params):
            raise LorakitError("AdaLoRA: update_and_allocate found no gradients; call it after "
                               "optimizer.step() and before optimizer.zero_grad()")
        for key, param in params:
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if key not in self.sensitivity:
                self.sensitivity[key] = torch.zeros_like(param)
                self.uncertainty[key] = torch.zeros_like(param)
            self.sensitivity[key], self.uncertainty[key] = update_importance(
                param.detach(), grad, self.sensitivity[key], self.uncertainty[key],
                self.config.beta1, self.config.beta2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: (r,) importance of each singular triplet}."""
        def score(module_name, kind):
            return self.sensitivity[(module_name, kind)] * self.uncertainty[(module_name, kind)]

        return {n: triplet_scores(score(n, "lora_A"), score(n, "lora_E"), score(n, "lora_B")) for n in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ_i of the lowest-scoring triplets so that ``budget`` remain; returns the rank_pattern."""
        scores = self.triplet_scores()
        threshold = budget_threshold(list(scores.values()), self.init_budget - budget)
        pattern = {}
        for module_name, layer in self.layers.items():
            keep = scores[module_name] > threshold if threshold is not None else \
                torch.ones_like(scores[module_name], dtype=torch.bool)
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[rank_pattern_key(module_name)] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero λ_i of every triplet the pattern prunes."""
        for module_name, layer in self.layers.items():
            mask = kept_triplets(rank_pattern, module_name)
            if mask is not None:
                E = layer.lora_E[self.adapter_name]
                keep = torch.tensor(mask, dtype=torch.bool, device=E.device).view(-1, 1)
                E.masked_fill_(~keep, 0.0)
