"""LoraLayer: a frozen linear layer plus one or more named low-rank adapters.

    y = base_layer(x) + Σ_active  s_a · B_a(A_a(dropout(x)))

x: (..., in) -> y: (..., out). A_a: Linear(in, r_a), B_a: Linear(r_a, out), s_a = alpha_a / r_a.
Adapters live in ``nn.ModuleDict``s keyed by adapter name, exactly as in peft, so the
in-memory names are ``<path>.lora_A.<adapter>.weight``. Adapter weights are kept in fp32
even when the frozen base is bf16; the input is cast to the adapter dtype and the update
back to the output dtype.

Wraps ``nn.Linear`` (weight (out, in)) and GPT-2's ``Conv1D`` (weight (in, out),
``fan_in_fan_out``). ``merge()`` / ``unmerge()`` are explicit; ``eval()`` never merges.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit._quantized import dense_dtype, dense_linear, is_quantized
from lorakit.adapters.dora.layer import DORA
from lorakit.adapters.lora.functional import (delta_weight, lora_linear, lora_linear_4bit, lora_scaling, merge_into,
                                              unmerge_from)
from lorakit.adapters.lora.variants import PLAIN, LoraVariant, init_strategy
from lorakit.errors import LorakitError

SUPPORTED_BASE_TYPES = (nn.Linear, Conv1D)


def base_layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    return base_layer.in_features, base_layer.out_features


def wrap_target(module: nn.Module, layer_class: type, module_name: str, method: str) -> nn.Module:
    """The adapter wrapper for a target module: ``module`` itself when it is already a
    ``layer_class``, a new ``layer_class(module)`` for a Linear / Conv1D, else a clear error."""
    if isinstance(module, layer_class):
        return module
    if isinstance(module, SUPPORTED_BASE_TYPES):
        return layer_class(module)
    raise LorakitError(f"target module '{module_name}' is a {type(module).__name__}; "
                       f"{method} adapts nn.Linear and Conv1D layers")


def pending_adapters(layer: nn.Module, names: list[str] | None = None) -> list[str]:
    """The adapters of a wrapper layer (active ones, or ``names``) that exist there and are not
    merged into its base weight: those a forward must add and a merge may fold in."""
    return [n for n in (names or layer.active_adapters) if n not in layer.merged_adapters and n in layer.lora_A]


def check_disable_allowed(layer: nn.Module) -> None:
    if layer.merged_adapters:
        raise LorakitError("adapters are merged into the base weights; call unmerge() before disabling them")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 over a half-precision base (fp64 stays fp64 for exact tests)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32



def _compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The dtype a frozen base computes in when the fused LoRA functions can take it: an nn.Linear's
    weight dtype, or a bitsandbytes 4-bit layer's compute dtype (its canonical layout, a bias in
    that dtype or none); None for any other base (int8, Conv1D, repacked 4-bit), which runs unfused."""
    if type(base) is nn.Linear:
        return base.weight.dtype
    state = getattr(base.weight, "quant_state", None)
    if type(base).__name__ != "Linear4bit" or state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    if base.compute_dtype is None or (base.bias is not None and base.bias.dtype != base.compute_dtype):
        return None
    return base.compute_dtype

class LoraLayer(nn.Module):
    """Wraps ``base_layer`` and adds named LoRA adapters; see module docstring for the math."""

    # Per-row adapters for one batch: a callable (x, base_result) -> result that lorakit.inference.mixed
    # sets on each layer inside ``mixed_adapters(...)``; None outside it.
    mixed_batch = None

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' m (adapters/dora)
        self.variants: dict[str, LoraVariant] = {}  # per adapter: PLAIN or DORA (adapters/lora/variants.py)
        self.pissa_initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA (A0, B0), for saving
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True, use_dora: bool = False) -> None:
        """Create adapter ``name`` (A: (r, in), B: (out, r)); with the default init B = 0,
        so the layer's output is unchanged until training moves B. ``use_dora`` adds DoRA's
        magnitude m = ||W + s·BA||_c (adapters/dora)."""
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.variants[name] = DORA if use_dora else PLAIN
        self.reset_adapter(name, init_lora_weights)
        self.variants[name].init(self, name)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def reset_adapter(self, name: str, init_lora_weights: bool | str) -> None:
        """Initialise A and B as ``init_lora_weights`` says (``variants.init_strategy``): True: A
        Kaiming-uniform, B = 0 (peft's default); "gaussian": A ~ N(0, 1/r), B = 0; False: both
        random; "pissa" / "pissa_niter_N": top-r singular directions of W, W becomes the residual."""
        init_strategy(init_lora_weights)(self, name)

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter '{name}' is merged into the base weights; unmerge it before deleting")
        self.pissa_initial.pop(name, None)
        self.variants.pop(name, PLAIN).delete(self, name)
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in table:
                del table[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """s · B A in the base weight's layout ((out, in), or (in, out) for Conv1D), fp32."""
        return delta_weight(self.lora_A[name].weight, self.lora_B[name].weight,
                            self.scaling[name], self.fan_in_fan_out)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s · B(A(dropout(x))) for one adapter: (..., in) -> (..., out), in the adapter dtype."""
        lora_A = self.lora_A[name]
        h = lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))  # (..., r)
        return self.lora_B[name](h) * self.scaling[name]  # (..., out)

    def _single_plain_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The adapter name when this forward is one plain LoRA adapter (no dropout, no DoRA) over
        a frozen nn.Linear in x's dtype, or a frozen 4-bit base computing in x's dtype: the case
        ``lora_linear`` (``lora_linear_4bit``) fuses. Adapters in another dtype
        than x (fp32 over a bf16 base) qualify only in a training step (mixed precision: the
        product in bf16, fp32 master weights); evaluation and generation keep the fp32 product."""
        if args or kwargs or self.disable_adapters or self.mixed_batch is not None:
            return None
        if torch.is_autocast_enabled(x.device.type):
            # autocast (transformers' Trainer with bf16=True, TRL's default) casts each op's inputs;
            # the fused function's in-place addmm would mix its bf16 product with the fp32 factors
            return None
        names = pending_adapters(self)
        if len(names) != 1 or not self.variants[names[0]].fusable:
            return None
        name, base = names[0], self.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        if not isinstance(self.lora_dropout[name], nn.Identity) or x.dtype != _compute_dtype(base):
            return None
        same_dtype = self.lora_A[name].weight.dtype == x.dtype
        return name if same_dtype or (self.training and torch.is_grad_enabled()) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._single_plain_adapter(x, args, kwargs)
        if name is not None:  # the common training case, fused (same math as the loop below)
            A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            if type(self.base_layer) is not nn.Linear:  # a 4-bit base (QLoRA)
                return lora_linear_4bit(x, self.base_layer, A, B, s)
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, s)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            check_disable_allowed(self)
            return result
        if self.mixed_batch is not None:
            return self.mixed_batch(x, result)
        for name in pending_adapters(self):
            result = self.variants[name].forward(self, name, x, result)
        return result

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or named) adapters into the base weight: W <- W + s·BA (DoRA:
        W <- g ⊙ (W + s·BA)). A quantized base is first replaced by a dense fp32 copy and
        rounded once to its original dtype after merging (never re-quantized)."""
        names = pending_adapters(self, adapter_names)
        target_dtype = None
        if names and is_quantized(self.base_layer):
            target_dtype, self.base_layer = dense_dtype(self.base_layer), dense_linear(self.base_layer)
        for name in names:
            merge_into(self.base_layer.weight, self.variants[name].merge_delta(self, name))
            self.merged_adapters.append(name)
        if target_dtype is not None:
            self.base_layer.to(target_dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()`` in reverse order: W <- W - s·BA."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unmerge_from(self.base_layer.weight, self.variants[name].unmerge_delta(self, name))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=({ranks})"
