"""FullConfig: full fine-tuning, the baseline every parameter-efficient method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit._dataclass_config import check_regex, peft_config_kwargs, strict_config
from lorakit.errors import LorakitError


@strict_config
@dataclass
class FullConfig:
    """Train the base model's own weights. trainable_modules: module-name suffixes (or one regex,
    peft's matching rules) whose parameters train; unset: every parameter. Training keeps the
    trained weights in fp32 (a bf16 weight cannot take AdamW's small updates), so
    ``train.precision: bf16`` does not halve this method's memory."""

    trainable_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        if isinstance(self.trainable_modules, (set, tuple)):
            self.trainable_modules = sorted(self.trainable_modules)
        modules = self.trainable_modules
        if modules is not None and not isinstance(modules, str) and not (
                isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
            raise LorakitError(f"FullConfig.trainable_modules must be a list of module names or a regex, got {modules!r}")
        if isinstance(modules, str):
            check_regex(modules, "FullConfig.trainable_modules")

    def to_dict(self) -> dict[str, Any]:
        return {"trainable_modules": self.trainable_modules, "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "FullConfig") -> "FullConfig":
        return cls(**peft_config_kwargs(cls, data, where))
