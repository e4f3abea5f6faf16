"""QLoraConfig: a LoraConfig plus how the base layers it adapts are quantized.

The quantization keys describe the *base*, not the adapter, so they are not written to
adapter_config.json: a QLoRA adapter is saved (and loads in peft) as an ordinary LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit._dataclass_config import strict_config
from lorakit.adapters.lora.config import LoraConfig
from lorakit.adapters.qlora.base import QUANT_CHOICES
from lorakit.errors import LorakitError

_BASE_KEYS = ("quantization", "compute_dtype", "double_quant")


@strict_config
@dataclass
class QLoraConfig(LoraConfig):
    """LoRA settings (see LoraConfig) over a quantized base. quantization: nf4 (default), fp4
    or int8. compute_dtype: dtype of the 4-bit base matmul (bfloat16). double_quant: quantize
    the per-block absmax values too (about 0.37 bits per weight saved)."""

    quantization: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.quantization not in QUANT_CHOICES:
            raise LorakitError(f"QLoraConfig.quantization must be one of {', '.join(QUANT_CHOICES)}; "
                               f"got {self.quantization!r}")

    def to_dict(self) -> dict[str, Any]:
        """adapter_config.json content: the plain LoRA keys (peft_type LORA)."""
        data = super().to_dict()
        for key in _BASE_KEYS:
            data.pop(key)
        return data
