"""The model of a training config, built without weights, and its parameters counted.

``sizing_model`` builds the configured architecture on the meta device (shapes and dtypes, no
data: a 70B model costs nothing) and injects the configured method into it with the very code
a run uses, so the trainable / frozen split is the run's, for every registered method. Only two
things cannot happen on meta and are sized by arithmetic instead:

- QLoRA's quantization (bitsandbytes needs real weights): the layers ``quantize_base`` would
  quantize are listed by the same rules and their bytes computed (``quantized_bytes``);
- PiSSA's SVD initialisation: it only chooses the values of A and B, not their shapes.

Bytes of a bitsandbytes 4-bit weight of n values (blocks of 64, one absmax each):

    codes: ceil(n/2) bytes;  absmax: 4·ceil(n/64) bytes, or with double quantization
    ceil(n/64) bytes of 8-bit absmax + 4·ceil(n/64/256) fp32 scales + 256·4 bytes of code table

and of an int8 (LLM.int8) weight (out, in): out·in bytes + 4·out bytes of row scales.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.adapters.qlora.base import quantization_targets
from lorakit.errors import LorakitError

_NF4_BLOCK, _NESTED_BLOCK, _CODE_BYTES = 64, 256, 256 * 4


def quantized_bytes(numel: int, out_features: int, quantization: str, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one quantized weight of ``numel`` values (module docstring)."""
    if quantization == "int8":
        return numel + 4 * out_features
    blocks = math.ceil(numel / _NF4_BLOCK)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / _NESTED_BLOCK) + _CODE_BYTES + 4
    else:
        absmax = 4 * blocks
    return math.ceil(numel / 2) + absmax + 16 * 4  # + the 16-value NF4 / FP4 code table


@dataclass
class ParameterCounts:
    """Parameters of an adapted model: trainable (the method's, held in fp32) and frozen (the
    base), by the dtype they are held in ("nf4" / "fp4" / "int8" for quantized weights); bytes
    as held (a quantized weight: ``quantized_bytes``; tied tensors counted once)."""

    trainable: int = 0
    frozen: int = 0
    frozen_by_dtype: dict[str, int] = field(default_factory=dict)
    trainable_bytes: int = 0
    frozen_bytes: int = 0           # the base's parameters as held plus its buffers
    largest_frozen_bytes: int = 0   # the largest single base tensor as loaded (a transient copy while loading)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _out_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]


def count_parameters(adapted: nn.Module, method_config=None) -> ParameterCounts:
    """Count ``adapted``'s parameters as ``ParameterCounts`` (``method_config``: a QLoraConfig
    when the frozen base is quantized, else None). Works on meta and real models alike."""
    counts = ParameterCounts()
    quantized = {}
    if method_config is not None and hasattr(method_config, "quantization"):
        quantized = quantization_targets(adapted.model, method_config)
    seen: set[int] = set()
    for param in adapted.parameters():  # parameters() yields a tied tensor once
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if param.requires_grad:
            counts.trainable += n
            counts.trainable_bytes += 4 * n  # adapters (and full fine-tuning's weights) train in fp32
            continue
        counts.frozen += n
        size = n * param.element_size()
        counts.largest_frozen_bytes = max(counts.largest_frozen_bytes, size)
        if id(param) in quantized:
            kind, module = quantized[id(param)]
            size = quantized_bytes(n, _out_features(module), kind, method_config.double_quant)
            name = kind
        else:
            name = _dtype_name(param.dtype)
        counts.frozen_by_dtype[name] = counts.frozen_by_dtype.get(name, 0) + n
        counts.frozen_bytes += size
    # buffers (rotary frequencies, GPT-2's causal mask) are memory of the base too, not parameters
    counts.frozen_bytes += sum(b.numel() * b.element_size() for b in adapted.buffers())
    return counts


def _meta_method_config(method_config):
    """The method config to inject on meta: QLoRA as plain LoRA (quantization is sized by
    arithmetic), PiSSA with plain init (the SVD only picks values). A copy: the run's is untouched."""
    from lorakit.adapters import LoraConfig

    if hasattr(method_config, "quantization"):
        data = {f.name: getattr(method_config, f.name) for f in dataclasses.fields(LoraConfig)}
        method_config = LoraConfig(**data)
    else:
        method_config = dataclasses.replace(method_config) if dataclasses.is_dataclass(method_config) else method_config
    if isinstance(getattr(method_config, "init_lora_weights", None), str):
        method_config.init_lora_weights = True
    return method_config


def sizing_model(model_config, method_config, base_dtype: torch.dtype, total_steps: int = 1):
    """The adapted model of a run on the meta device: ``model_config`` a transformers config,
    ``method_config`` the run's method config, the base in ``base_dtype``. SDPA attention, as a
    loaded model uses by default."""
    from transformers import AutoModelForCausalLM

    from lorakit.adapters import method_for_config
    from lorakit.models.inject import get_peft_model

    meta_config = _meta_method_config(method_config)
    method = method_for_config(meta_config)
    if method.set_total_steps is not None:
        method.set_total_steps(meta_config, total_steps)
    try:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(model_config, dtype=base_dtype, attn_implementation="sdpa")
    except (ValueError, KeyError) as err:
        raise LorakitError(f"estimate: cannot build model type '{getattr(model_config, 'model_type', '?')}' "
                           f"from its config ({str(err).splitlines()[0]})") from None
    base.eval()
    return get_peft_model(base, meta_config)
