"""BottleneckLayer: a frozen output projection followed by named bottleneck adapters.

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP") and Pfeiffer et al. 2021
("AdapterFusion"): a small MLP with its own skip connection acts on the *output* of a sublayer's
output projection, before the block's residual add:

    h = base_layer(x)                                            (..., d)
    y = h + W_up σ(W_down dropout(h) + b_down) + b_up            (..., d) -> (..., m) -> (..., d)

d = the projection's output size (the hidden size), m = max(1, d // reduction_factor).
W_down: Linear(d, m) = ``adapter_down``, W_up: Linear(m, d) = ``adapter_up``, both with biases,
in ``nn.ModuleDict``s keyed by adapter name, as AdapterHub names them, so in memory
``<path>.down_proj.adapter_down.<adapter>.weight`` and in the file (``lorakit._file_keys``)
``base_model.model.<path>.down_proj.adapter_down.weight`` / ``.bias`` and ``adapter_up.*``.
This is lorakit's own layout: AdapterHub's library, which defines these adapters, does not
install next to transformers 5, and peft has no bottleneck adapters.

Several active adapters are applied in sequence (AdapterHub's ``Stack``): each acts on the
previous one's output. Adapter weights are fp32 over a half-precision base; h is cast to the
adapter dtype and the update back. σ is non-linear, so an adapter is not a weight update:
``merge()`` refuses, and there is never a merged adapter to ``unmerge()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.lora.layer import adapter_dtype, base_layer_features
from lorakit.errors import LorakitError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
MERGE_ERROR = ("bottleneck adapters are non-linear and cannot be merged into the weights; "
               "use them on the unchanged base model (load_adapter) instead")


def bottleneck_size(hidden: int, reduction_factor: float) -> int:
    """m = hidden // reduction_factor, at least 1 (as AdapterHub sizes its down-projection)."""
    return max(1, int(hidden // reduction_factor))


class BottleneckLayer(nn.Module):
    """Wraps ``base_layer`` and adds named bottleneck adapters; see module docstring for the math."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer_features(base_layer)
        self.adapter_down = nn.ModuleDict()  # W_down, b_down: (m, d), (m,)
        self.adapter_up = nn.ModuleDict()  # W_up, b_up: (d, m), (d,)
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []  # always empty: nothing is ever merged
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    def add_adapter(self, name: str, bottleneck: int, non_linearity: str = "relu", dropout: float = 0.0,
                    init_weights: bool = True) -> None:
        """Create adapter ``name`` with a bottleneck of ``bottleneck`` units (see ``reset_adapter``)."""
        if non_linearity not in ACTIVATIONS:
            raise LorakitError(f"non_linearity '{non_linearity}' is unknown; valid choices: {', '.join(ACTIVATIONS)}")
        factory = {"device": self.base_layer.weight.device, "dtype": adapter_dtype(self.base_layer.weight)}
        self.adapter_down[name] = nn.Linear(self.out_features, bottleneck, **factory)
        self.adapter_up[name] = nn.Linear(bottleneck, self.out_features, **factory)
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.non_linearity[name] = non_linearity
        self.reset_adapter(name, init_weights)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    @torch.no_grad()
    def reset_adapter(self, name: str, init_weights: bool) -> None:
        """True: W_down Kaiming-uniform (nn.Linear's init), b_down = 0, W_up = 0, b_up = 0, so the
        adapter adds exactly 0 and training starts from the base model (a zero W_up still gets a
        gradient, σ(W_down h) ≠ 0). False: nn.Linear's random init for all four (not an identity)."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        down.reset_parameters()
        up.reset_parameters()
        if init_weights:
            for tensor in (down.bias, up.weight, up.bias):
                nn.init.zeros_(tensor)

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_down

    def delete_adapter(self, name: str) -> None:
        for table in (self.adapter_down, self.adapter_up, self.adapter_dropout):
            if name in table:
                del table[name]
        self.non_linearity.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_output(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """W_up σ(W_down dropout(h) + b_down) + b_up: (..., d) -> (..., d), in the adapter dtype."""
        down = self.adapter_down[name]
        z = down(self.adapter_dropout[name](h.to(down.weight.dtype)))  # (..., m)
        return self.adapter_up[name](ACTIVATIONS[self.non_linearity[name]](z))  # (..., d)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # h: (..., d)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.adapter_down:  # the adapter's own skip connection: h + f(h)
                result = result + self.adapter_output(name, result).to(result.dtype)
        return result

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Refused when there is an adapter to merge: y = h + f(h) with a non-linear f is no
        weight update W' of the base layer. A layer without the named / active adapters has
        nothing to merge (another method's adapter may be the one being merged)."""
        if any(n in self.adapter_down for n in (adapter_names or self.active_adapters)):
            raise LorakitError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged (see ``merge``)."""

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: m={self.adapter_down[n].out_features}, {self.non_linearity[n]}"
                             for n in self.adapter_down)
        return f"out={self.out_features}, adapters=({adapters})"
