"""AdaLoraLayer: a frozen linear layer plus named adapters in SVD form (AdaLoRA).

    y = base_layer(x) + Σ_active  α/(r₀ + ε) · P (Λ ⊙ Q) dropout(x)

x: (..., in) -> y: (..., out). Q = lora_A (r, in), Λ = lora_E (r, 1), P = lora_B (out, r),
r₀ = ``ranknum`` (init_r, fixed even after pruning so the kept triplets keep their scale),
α = lora_alpha (α = r when lora_alpha is 0, as in peft). Parameters live in
``nn.ParameterDict``s keyed by adapter name, exactly as peft's ``SVDLinear``, so the names
are ``<path>.lora_A.<adapter>`` in memory and ``<path>.lora_A`` on disk.

Pruning a triplet zeroes λ_i (training keeps the full init_r shapes so the optimizer's
state stays valid); saving drops pruned triplets and loading builds the kept rank directly.
Wraps ``nn.Linear`` and GPT-2's ``Conv1D``; ``merge()`` / ``unmerge()`` are explicit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.adalora.functional import svd_delta_weight, svd_scale
from lorakit.adapters.lora.functional import merge_into, unmerge_from
from lorakit.adapters.lora.layer import adapter_dtype, base_layer_features, check_disable_allowed, pending_adapters
from lorakit.errors import LorakitError


class AdaLoraLayer(nn.Module):
    """Wraps ``base_layer`` and adds named AdaLoRA adapters; see module docstring for the math."""

    # Per-row adapters for one batch: a callable (x, base_result) -> result set by
    # lorakit.inference.mixed inside ``mixed_adapters(...)`` (as on LoraLayer); None outside it.
    mixed_batch = None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer_features(base_layer)
        self.lora_A = nn.ParameterDict()  # Q: (r, in) right singular vectors
        self.lora_E = nn.ParameterDict()  # Λ: (r, 1) singular values
        self.lora_B = nn.ParameterDict()  # P: (out, r) left singular vectors
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    init_lora_weights: bool = True, ranknum: int | None = None) -> None:
        """Create adapter ``name`` with ``r`` triplets. ``ranknum`` (default r) is the rank the
        scale divides by: init_r, also when a pruned adapter is loaded with fewer triplets."""
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, **factory))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(r)
        self.ranknum[name] = float(r if ranknum is None else ranknum)
        self.reset_adapter(name, init_lora_weights)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_lora_weights: bool) -> None:
        """True (peft's default): Λ = 0, P and Q ~ N(0, 0.02²), so the layer starts as the base.
        False: all three ~ N(0, 1) (a non-identity adapter, useful for tests)."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        if init_lora_weights:
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        else:
            for param in (A, E, B):
                nn.init.normal_(param)

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter '{name}' is merged into the base weights; unmerge it before deleting")
        for table in (self.lora_A, self.lora_E, self.lora_B, self.lora_dropout):
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.ranknum):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout ((out, in), or (in, out) for Conv1D), fp32."""
        return svd_delta_weight(self.lora_A[name], self.lora_E[name], self.lora_B[name],
                                self.scaling[name], self.ranknum[name], self.fan_in_fan_out)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """α/(r₀ + ε) · P (Λ ⊙ Q) dropout(x): (..., in) -> (..., out), in the adapter dtype."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        h = self.lora_dropout[name](x.to(A.dtype)) @ (A * E).T  # (..., r)
        return (h @ B.T) * svd_scale(self.scaling[name], self.ranknum[name])  # (..., out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            check_disable_allowed(self)
            return result
        if self.mixed_batch is not None:
            return self.mixed_batch(x, result)
        for name in pending_adapters(self):
            result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight: W <- W + ΔW."""
        for name in pending_adapters(self, adapter_names):
            merge_into(self.base_layer.weight, self.get_delta_weight(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` in reverse order: W <- W − ΔW."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unmerge_from(self.base_layer.weight, self.get_delta_weight(name))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=({ranks})"
