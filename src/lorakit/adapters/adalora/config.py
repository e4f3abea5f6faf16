"""AdaLoraConfig: peft's parameter names and defaults for AdaLoRA, validated on construction.

A user of ``peft.AdaLoraConfig`` can switch the import line and keep the rest of their code,
and ``from_dict`` reads the adapter_config.json peft writes for AdaLoRA. Differences from peft
(deliberate): ``task_type`` defaults to "CAUSAL_LM"; options AdaLoRA ignores in peft
(``use_rslora``, ``alpha_pattern``) are errors when set instead of being silently dropped;
``total_step`` may stay unset until a trainable adapter is created (``lorakit train`` fills
in the run's step count), where peft requires it at construction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from lorakit._dataclass_config import (check_module_selection, is_number, peft_config_dict, peft_config_kwargs,
                                      strict_config)
from lorakit.adapters.lora.config import BIAS_CHOICES
from lorakit.errors import LorakitError


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@strict_config
@dataclass
class AdaLoraConfig:
    """Adaptive-budget LoRA settings (Zhang et al. 2023), named as in ``peft.AdaLoraConfig``.

    Every adapted matrix starts with ``init_r`` singular triplets; the rank allocator prunes
    the least important ones on a cubic schedule until the total kept rank is
    ``target_r × (number of adapted matrices)``. Training has three phases over
    ``total_step`` optimizer steps: warm-up (step <= tinit, full budget), pruning
    (tinit < step < total_step - tfinal, a new mask every ``deltaT`` steps), and final
    fine-tuning (the last ``tfinal`` steps, mask fixed).

    beta1 / beta2: EMA factors for the sensitivity |θ·∇θ| and its uncertainty.
    orth_reg_weight: weight of the penalty mean(||PᵀP − I||_F, ||QQᵀ − I||_F over every P and Q),
    added to the loss in training mode.
    lora_alpha: the update is scaled by lora_alpha / init_r (not by the kept rank).
    rank_pattern: written by the allocator, {"<module>.lora_E": [kept?] * init_r};
    a loaded adapter's matrices have exactly the kept rank.
    ``r`` exists only because peft writes it; AdaLoRA ignores it (use init_r / target_r).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    r: int = 8
    use_rslora: bool = False
    use_dora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    peft_type = "ADALORA"  # class attribute, not a field: fixed for this config type

    def __post_init__(self):
        for name in ("init_r", "deltaT"):
            if not _positive_int(getattr(self, name)):
                raise LorakitError(f"AdaLoraConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("target_r", "tinit", "tfinal"):
            if not _non_negative_int(getattr(self, name)):
                raise LorakitError(f"AdaLoraConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:
            raise LorakitError(f"AdaLoraConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r}): "
                               f"AdaLoRA only removes rank")
        if self.total_step is not None:
            self.check_schedule()
        for name in ("beta1", "beta2"):
            if not (is_number(getattr(self, name)) and 0.0 < getattr(self, name) < 1.0):
                raise LorakitError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not (is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise LorakitError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not is_number(self.lora_alpha):
            raise LorakitError(f"AdaLoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not (is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise LorakitError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise LorakitError(f"AdaLoraConfig.bias must be one of {', '.join(BIAS_CHOICES)}; got {self.bias!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise LorakitError(f"AdaLoraConfig.init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        if self.use_dora:
            raise LorakitError("AdaLoraConfig.use_dora: AdaLoRA cannot be combined with DoRA; "
                               "for DoRA use LoraConfig(use_dora=True)")
        if self.use_rslora:
            raise LorakitError("AdaLoraConfig.use_rslora: AdaLoRA scales by lora_alpha / init_r; rsLoRA does not apply")
        if self.alpha_pattern:
            raise LorakitError("AdaLoraConfig.alpha_pattern: AdaLoRA uses one lora_alpha for every module; "
                               "leave alpha_pattern empty")
        if self.r != 8:
            warnings.warn("AdaLoraConfig.r is ignored by AdaLoRA; set init_r (initial rank) and target_r (average "
                          "final rank) instead", stacklevel=3)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        check_module_selection(self, "AdaLoraConfig")
        if self.layers_pattern and self.layers_to_transform is None:
            raise LorakitError("AdaLoraConfig.layers_pattern needs layers_to_transform (the layer indices to adapt)")
        self._check_rank_pattern()

    def check_schedule(self) -> None:
        """total_step is set and leaves a pruning phase between tinit and total_step - tfinal."""
        if not _positive_int(self.total_step):
            raise LorakitError(f"AdaLoraConfig.total_step must be the number of training steps (> 0), got "
                               f"{self.total_step!r}; the rank budget schedule is defined over it")
        if self.tinit >= self.total_step - self.tfinal:
            raise LorakitError(f"AdaLoraConfig: tinit ({self.tinit}) must be < total_step - tfinal "
                               f"({self.total_step} - {self.tfinal}) so that there is a pruning phase; "
                               f"decrease tinit/tfinal or increase total_step")

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise LorakitError(f"AdaLoraConfig.rank_pattern must map '<module>.lora_E' to a list of "
                               f"{self.init_r} booleans, got {type(self.rank_pattern).__name__}")
        for key, mask in self.rank_pattern.items():
            if (not isinstance(mask, list) or len(mask) != self.init_r
                    or not all(isinstance(v, bool) or v in (0, 1) for v in mask)):
                raise LorakitError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of {self.init_r} "
                                   f"booleans (one per initial singular triplet), got {mask!r}")
            self.rank_pattern[key] = [bool(v) for v in mask]

    # --- serialisation in peft's adapter_config.json layout -----------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field plus ``peft_type``."""
        return peft_config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "AdaLoraConfig") -> "AdaLoraConfig":
        """Build from a dict (YAML, or a peft adapter_config.json); see ``peft_config_kwargs``."""
        kwargs = peft_config_kwargs(cls, data, where)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a peft file may carry any r; it is ignored either way
            return cls(**kwargs)
