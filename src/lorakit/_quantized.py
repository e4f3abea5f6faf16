"""Reading quantized base layers: the few functions adapter layers, merging and the training
loop need to treat a bitsandbytes layer like a dense one (a leaf module: imports nothing of
lorakit but the error type and the quantized embedding, so ``adapters`` and ``models`` can both
use it). Creating quantized layers is ``lorakit.adapters.qlora.base``'s job.

bitsandbytes is imported lazily: ``is_quantized`` answers False without importing it when no
quantized layer can exist yet.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorakit._quantized_embedding import QuantizedEmbedding
from lorakit.errors import LorakitError


def _bnb():
    try:
        import bitsandbytes
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency here
        raise LorakitError("quantized bases need bitsandbytes; install it with: pip install bitsandbytes") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer or a QuantizedEmbedding (no import
    when bnb is unused)."""
    if isinstance(module, QuantizedEmbedding):
        return True
    if "bitsandbytes" not in sys.modules:
        return False
    bnb_nn = sys.modules["bitsandbytes"].nn
    return isinstance(module, (bnb_nn.Linear4bit, bnb_nn.Linear8bitLt))


def dequantize_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (out, in) of a quantized linear layer, or the (num, dim) table of a
    QuantizedEmbedding (a fresh tensor, no grad)."""
    bnb = _bnb()
    weight = module.weight
    with torch.no_grad():
        if isinstance(module, (bnb.nn.Linear4bit, QuantizedEmbedding)):
            dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scb = weight.SCB if weight.SCB is not None else module.state.SCB
            dense = bnb.functional.int8_vectorwise_dequant(weight.data, scb)
        else:
            raise LorakitError(f"{type(module).__name__} is not a quantized layer")
    return dense if dtype is None else dense.to(dtype)


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """W as (out, in) for any supported base: a view for Linear / Conv1D, dequantized for bnb."""
    if is_quantized(base_layer):
        return dequantize_weight(base_layer)
    weight = base_layer.weight
    return weight.T if type(base_layer).__name__ == "Conv1D" else weight


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer's weight had before quantization (4-bit records it in its
    quant state); bf16 for int8 layers, which do not record it."""
    state = getattr(module.weight, "quant_state", None)
    return state.dtype if state is not None else torch.bfloat16


def dense_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A regular nn.Linear with ``module``'s dequantized weight in ``dtype`` (never re-quantized)."""
    weight = dequantize_weight(module, dtype)
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    layer.requires_grad_(False)
    return layer
