"""BottleneckConfig: bottleneck adapters (Houlsby / Pfeiffer), validated on construction.

The names follow the AdapterHub ``adapters`` library (``reduction_factor``, ``non_linearity``,
``seq_bn`` = Pfeiffer, ``double_seq_bn`` = Houlsby). That library cannot be installed next to
transformers 5 (it pins transformers ~=4.57), so lorakit reads and writes its own documented
layout instead (see ``adapters/bottleneck/layer.py``): adapter_config.json with
``peft_type: "BOTTLENECK"`` and adapter_model.safetensors. BOTTLENECK is a lorakit-only type:
peft has no bottleneck adapters and cannot load these files.

Placement becomes ``target_modules`` at construction: when ``target_modules`` is not given it is
filled with the placement's module-name suffixes (``PLACEMENT_TARGETS``), so the saved config
records exactly which modules were wrapped and loading rebuilds the same layers from the file
alone, whatever later versions add to the table. A given ``target_modules`` replaces placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit._dataclass_config import (check_module_selection, is_number, peft_config_dict, peft_config_kwargs,
                                      strict_config)
from lorakit.errors import LorakitError, closest_hint

# The output projection of each sublayer, as full suffixes so that GPT-2's ``attn.c_proj`` and
# ``mlp.c_proj`` are told apart (a bare "c_proj" would match both).
MLP_OUTPUTS = [
    "mlp.down_proj",      # Llama, Qwen2/3, Mistral, Gemma, Phi-3
    "mlp.c_proj",         # GPT-2
    "mlp.fc2",            # Phi-1/2
    "mlp.dense_4h_to_h",  # GPT-NeoX
]
ATTENTION_OUTPUTS = [
    "self_attn.o_proj",   # Llama, Qwen2/3, Mistral, Gemma, Phi-3
    "attn.c_proj",        # GPT-2 (".attn.c_proj": never matches "mlp.c_proj")
    "self_attn.dense",    # Phi-1/2
    "attention.dense",    # GPT-NeoX
]
# Pfeiffer et al. 2021: one adapter per block, after the feed-forward sublayer.
# Houlsby et al. 2019: two per block, after the attention and after the feed-forward sublayer.
PLACEMENT_TARGETS = {"pfeiffer": MLP_OUTPUTS, "houlsby": ATTENTION_OUTPUTS + MLP_OUTPUTS}
NON_LINEARITIES = ("relu", "gelu", "swish", "silu", "tanh")


@strict_config
@dataclass
class BottleneckConfig:
    """Bottleneck adapter settings (Houlsby et al. 2019; Pfeiffer et al. 2021).

    Each adapter acts on the output h (..., d) of a sublayer's output projection:
    y = h + W_up σ(W_down h + b_down) + b_up, with W_down (m, d), W_up (d, m) and
    m = max(1, d // reduction_factor) (d: the projection's output size, the model's hidden size).

    placement: "pfeiffer" (one adapter per block, after the MLP output projection) or
      "houlsby" (two: after the attention output projection too); see ``PLACEMENT_TARGETS``.
    target_modules: module-name suffixes (or a regex, or "all-linear") to wrap instead of the
      placement's; filled in from placement when not given. non_linearity: σ, one of
      ``NON_LINEARITIES`` (swish = silu). adapter_dropout: dropout on the adapter's input h.
    init_weights: True: W_up = 0 and b_up = 0, so every layer starts as the identity (the model
      computes the base model); False: random up and down projections (tests).
    bias: "none" only (the adapter's own biases always train; base biases stay frozen).
    """

    placement: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    adapter_dropout: float = 0.0
    init_weights: bool = True
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    peft_type = "BOTTLENECK"  # class attribute, not a field; a lorakit-only type (peft cannot read it)

    def __post_init__(self):
        if not isinstance(self.placement, str) or self.placement not in PLACEMENT_TARGETS:
            raise LorakitError(f"BottleneckConfig.placement {self.placement!r} is unknown"
                               f"{closest_hint(str(self.placement), PLACEMENT_TARGETS)}; valid choices: "
                               f"{', '.join(PLACEMENT_TARGETS)}")
        if not is_number(self.reduction_factor) or not self.reduction_factor > 0:
            raise LorakitError(f"BottleneckConfig.reduction_factor must be a positive number (bottleneck size = "
                               f"hidden size // reduction_factor), got {self.reduction_factor!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise LorakitError(f"BottleneckConfig.non_linearity {self.non_linearity!r} is unknown"
                               f"{closest_hint(str(self.non_linearity), NON_LINEARITIES)}; valid choices: "
                               f"{', '.join(NON_LINEARITIES)}")
        if not is_number(self.adapter_dropout) or not 0.0 <= self.adapter_dropout < 1.0:
            raise LorakitError(f"BottleneckConfig.adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if not isinstance(self.init_weights, bool):
            raise LorakitError(f"BottleneckConfig.init_weights must be true or false, got {self.init_weights!r}")
        if self.bias != "none":
            raise LorakitError(f"BottleneckConfig.bias must be 'none', got {self.bias!r}: the adapter's own "
                               f"biases always train and the base layers' biases stay frozen")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if self.target_modules is None:  # recorded in the saved config: loading wraps the same modules
            self.target_modules = list(PLACEMENT_TARGETS[self.placement])
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        check_module_selection(self, "BottleneckConfig")

    # --- serialisation (lorakit's adapter_config.json, peft's shape with peft_type BOTTLENECK) ---
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field plus ``peft_type``."""
        return peft_config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "BottleneckConfig") -> "BottleneckConfig":
        """Build from a dict (YAML, or a saved adapter_config.json); unknown keys are errors."""
        return cls(**peft_config_kwargs(cls, data, where))
