"""QLoraConfig: a LoraConfig plus how the base layers it adapts are quantized.

The quantization keys describe the *base*, not the adapter, so they are not written to
adapter_config.json: a QLoRA adapter is saved (and loads in peft) as an ordinary LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit._dataclass_config import strict_config
from lorakit.adapters.lora.config import LoraConfig
from lorakit.adapters.qlora.base import QUANT_CHOICES, quantize_base
from lorakit.errors import LorakitError

_BASE_KEYS = ("quantization", "compute_dtype", "double_quant", "quantize_embeddings")


@strict_config
@dataclass
class QLoraConfig(LoraConfig):
    """LoRA settings (see LoraConfig) over a quantized base. quantization: nf4 (default), fp4
    or int8. compute_dtype: dtype of the 4-bit base matmul: auto (default: bfloat16 where this
    CPU's bf16 matmul is native and measured faster, else float32; lorakit.hardware), float32,
    bfloat16 or float16. double_quant: quantize
    the per-block absmax values too (about 0.37 bits per weight saved). quantize_embeddings:
    hold the input embedding and the output head (one table when tied) in the same 4-bit format;
    unset: yes for nf4 / fp4 where the model's embedding is a plain nn.Embedding, no for int8
    (see lorakit.adapters.qlora.base for why this differs from the QLoRA paper)."""

    quantization: str = "nf4"
    compute_dtype: str = "auto"
    double_quant: bool = True
    quantize_embeddings: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.quantization not in QUANT_CHOICES:
            raise LorakitError(f"QLoraConfig.quantization must be one of {', '.join(QUANT_CHOICES)}; "
                               f"got {self.quantization!r}")
        if self.quantize_embeddings not in (None, True, False):
            raise LorakitError(f"QLoraConfig.quantize_embeddings must be true, false or unset; "
                               f"got {self.quantize_embeddings!r}")
        if self.quantize_embeddings and self.quantization == "int8":
            raise LorakitError("QLoraConfig.quantize_embeddings needs a 4-bit quantization (nf4 or fp4); "
                               "unset it or set it to false for quantization int8")

    def prepare_base(self, model):
        """Quantize the whole base as this config says (every linear layer, and the embedding and
        output head unless quantize_embeddings is false), in place; returns ``model``. Attaching
        quantizes only the adapted layers: call this on the base before injecting adapters."""
        return quantize_base(model, self.quantization, self.compute_dtype, self.double_quant,
                             quantize_embeddings=self.quantize_embeddings)

    def to_dict(self) -> dict[str, Any]:
        """adapter_config.json content: the plain LoRA keys (peft_type LORA)."""
        data = super().to_dict()
        for key in _BASE_KEYS:
            data.pop(key)
        return data
