"""LoraConfig: PEFT's parameter names and defaults, validated on construction.

A user of ``peft.LoraConfig`` can switch the import line and keep the rest of their code.
Differences from peft (deliberate): ``task_type`` defaults to "CAUSAL_LM" because lorakit
adapts causal language models only, and invalid values fail at construction with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit._dataclass_config import (check_module_selection, check_regex, is_number, peft_config_dict,
                                      peft_config_kwargs, strict_config)
from lorakit.errors import LorakitError

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "pissa")  # and "pissa_niter_<N>"

def _is_pissa_niter(value) -> bool:
    return isinstance(value, str) and value.startswith("pissa_niter_") and value[len("pissa_niter_"):].isdigit()


@strict_config
@dataclass
class LoraConfig:
    """Low-rank adapter settings (Hu et al. 2021), named as in ``peft.LoraConfig``.

    r: rank of A (r, in) and B (out, r). lora_alpha: scale numerator, s = alpha / r
    (alpha / sqrt(r) when use_rslora). target_modules: list of module-name suffixes,
    a regex matched against the full module name, or "all-linear" (every Linear/Conv1D
    except the output head). rank_pattern / alpha_pattern: per-module overrides keyed by a
    name suffix or regex.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    peft_type = "LORA"  # class attribute, not a field: fixed for this config type

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LorakitError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not is_number(self.lora_alpha):
            raise LorakitError(f"LoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not (is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise LorakitError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise LorakitError(f"LoraConfig.bias must be one of {', '.join(BIAS_CHOICES)}; got {self.bias!r}")
        if self.init_lora_weights not in INIT_CHOICES and not _is_pissa_niter(self.init_lora_weights):
            choices = ", ".join(repr(c) for c in INIT_CHOICES) + ", 'pissa_niter_<N>'"
            raise LorakitError(f"LoraConfig.init_lora_weights must be one of {choices}; got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and isinstance(self.target_modules, str) \
                and self.target_modules != "all-linear":
            raise LorakitError("LoraConfig.layers_to_transform needs target_modules as a list of names (as in "
                               "peft), not a regex; put the layer numbers in the regex instead")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise LorakitError(f"LoraConfig.{name} must map module names to values, got {getattr(self, name)!r}")
        check_module_selection(self, "LoraConfig")
        for name in (*self.rank_pattern, *self.alpha_pattern):  # keys are name suffixes or regexes (pattern_value)
            if not isinstance(name, str):
                raise LorakitError(f"LoraConfig.rank_pattern / alpha_pattern keys must be module names, got {name!r}")
            check_regex(name, "LoraConfig.rank_pattern / alpha_pattern key", r"(.*\.)?({})$")
        for name, alpha in self.alpha_pattern.items():
            if not is_number(alpha):
                raise LorakitError(f"LoraConfig.alpha_pattern[{name!r}] must be a number, got {alpha!r}")
        for name, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise LorakitError(f"LoraConfig.rank_pattern[{name!r}] must be a positive integer, got {rank!r}")

    # --- serialisation in peft's adapter_config.json layout -----------------------------
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: every field plus ``peft_type``."""
        return peft_config_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "LoraConfig") -> "LoraConfig":
        """Build from a dict (YAML, or a peft adapter_config.json); see ``peft_config_kwargs``."""
        return cls(**peft_config_kwargs(cls, data, where))
