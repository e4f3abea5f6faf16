"""Quantized *base* layers for QLoRA (Dettmers et al. 2023), through bitsandbytes.

QLoRA is the LoRA layer over a frozen 4-bit base: every ``nn.Linear`` / GPT-2 ``Conv1D``
weight W (out, in) becomes a bitsandbytes ``Linear4bit`` holding NF4 codes (two per byte)
with one absmax per block of 64 weights; with double quantization those absmax values are
themselves 8-bit quantized (blocks of 256, one fp32 scale each), so storage is about

    bits / weight = 4 + 8/64 + 32/(64·256) ≈ 4.127   (vs 16 for bf16: ratio ≈ 0.258)

The base computes in ``compute_dtype`` (auto: bf16 where the host has fast native bf16, else
fp32; ``resolve_compute_dtype``) while the adapters stay fp32 (LoraLayer casts
the input to the adapter dtype). An 8-bit base (``Linear8bitLt``, LLM.int8 with per-row
absmax scales) is available too.

Embeddings (``quantize_embeddings``, on by default for 4-bit): the input embedding becomes a
``QuantizedEmbedding`` (embedding.py) holding its table in the same NF4 format, and the output head
a ``Linear4bit``; a head tied to the embedding shares the very same quantized parameter, so the
table is stored once, in 4 bits. The QLoRA paper (and transformers' 4-bit loading) keep both in
16-bit, which costs little in a 7B model (the 32k x 4096 table is 2% of it) but dominates a small
model with a large vocabulary: SmolLM2-135M's tied 49152 x 576 table is 28% of its weights, and
kept in bf16 it holds the whole base at about 0.42x of bf16 instead of 0.26x. The price is NF4
error on the logits' weight and one dequantization of the table per forward and backward (as for
every 4-bit layer); ``quantize_embeddings=False`` keeps them dense. An int8 base keeps its
embeddings dense: bitsandbytes' int8 layer moves its row scales on the first forward, so a
table cannot be shared with a tied head.

bitsandbytes is imported lazily: only functions that create or read quantized layers need it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorakit._quantized import _bnb, dense_dtype, dense_linear, dense_weight, dequantize_weight, is_quantized  # noqa: F401 - re-exported (qlora API)
from lorakit._dtypes import resolve_dtype
from lorakit._fingerprint import base_record
from lorakit._modules import replace_module, set_submodule
from lorakit._quantized_embedding import QuantizedEmbedding
from lorakit.adapters.contract import AdapterLayer
from lorakit.adapters.qlora.streamed import is_prequantized
from lorakit.errors import LorakitError

QUANT_CHOICES = ("nf4", "fp4", "int8")


def _linear_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), bias) of a Linear or GPT-2 Conv1D (whose weight is stored (in, out))."""
    weight = module.weight.detach()
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    bias = module.bias.detach() if module.bias is not None else None
    return weight.contiguous(), bias


def quantize_linear(module: nn.Module, quantization: str = "nf4", compute_dtype=torch.bfloat16,
                    double_quant: bool = True, consume: bool = False) -> nn.Module:
    """A bitsandbytes copy of a Linear / Conv1D: NF4 (or FP4) 4-bit, or int8 (LLM.int8).
    ``consume``: quantize the module's own weight tensor instead of a copy of it (the caller
    discards the dense module: a streaming load saves one dense copy of every weight)."""
    bnb = _bnb()
    prequantized = quantization in ("nf4", "fp4") and is_prequantized(module.weight)  # quantized as it streamed in
    if prequantized:
        weight, bias = module.weight, None if module.bias is None else module.bias.detach()
        out_features, in_features = weight.quant_state.shape
    else:
        weight, bias = _linear_weight_and_bias(module)
        if not consume:
            weight = weight.clone()
        out_features, in_features = weight.shape
    device = weight.device
    if quantization in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=quantization, device="meta")
        layer.weight = weight if prequantized else bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=double_quant, quant_type=quantization)
    elif quantization == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise LorakitError(f"unknown quantization '{quantization}'; valid choices: {', '.join(QUANT_CHOICES)}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    # bitsandbytes' CPU path repacks a 4-bit weight in place the first time it runs in eval mode
    # without grad (an AVX512-BF16 layout, absmax un-nested to bf16): it fails for in_features < 64,
    # its result bypasses autograd if training resumes, and dequantize_4bit no longer reads it.
    # Keep the one canonical layout.
    layer.support_avx512bf16_for_cpu = False
    try:
        layer = layer.to(device)  # bitsandbytes quantizes when the weight is moved to a device (once)
    except (RuntimeError, NotImplementedError) as err:
        raise LorakitError(f"bitsandbytes cannot run {quantization} on {device} here "
                           f"({str(err).splitlines()[0]}); use another quantization or device") from None
    return layer


def _output_head_ids(model: nn.Module) -> set[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(head)} if head is not None else set()


def _table_as_linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear (dim -> num) viewing an embedding table (num, dim), to quantize it as one."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return layer


def quantize_embedding_and_head(model: nn.Module, quantization: str = "nf4", compute_dtype=torch.bfloat16,
                                double_quant: bool = True, strict: bool = True, consume: bool = False) -> nn.Module:
    """Quantize the input embedding (a QuantizedEmbedding) and the output head (a Linear4bit) of
    ``model`` in place, 4-bit only; a head tied to the embedding shares its quantized parameter.
    Layers already quantized are left alone; returns ``model``. An embedding or head of another
    type (Gemma's scaled embedding) is an error, or with ``strict=False`` a warning that leaves
    that pair dense. ``consume``: see ``quantize_linear``."""
    if quantization not in ("nf4", "fp4"):
        raise LorakitError(f"quantized embeddings need a 4-bit quantization (nf4 or fp4), not '{quantization}'; "
                           "set quantize_embeddings to false")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(head, "base_layer", head)  # a LoraLayer on the head: quantize its base
    for what, module, kind in (("input embedding", embedding, nn.Embedding), ("output head", head, nn.Linear)):
        if module is not None and type(module) is not kind and not is_quantized(module):
            message = (f"cannot quantize the {what} {type(module).__name__} (only {kind.__name__}); "
                       "set quantize_embeddings to false")
            if strict:
                raise LorakitError(message)
            warnings.warn(f"lorakit: {message}; the embedding and the output head stay dense", stacklevel=3)
            return model
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    quantized_head = None
    if head is not None and type(head) is nn.Linear:
        quantized_head = quantize_linear(head, quantization, compute_dtype, double_quant, consume)
        replace_module(model, head, quantized_head)
    if embedding is not None and type(embedding) is nn.Embedding:
        if tied:  # one table: the embedding reads the head's 4-bit codes
            table = quantized_head.weight
        elif is_prequantized(embedding.weight):  # quantized as it streamed in
            table = embedding.weight
        else:
            table = quantize_linear(_table_as_linear(embedding.weight), quantization, compute_dtype,
                                    double_quant, consume).weight
        replace_module(model, embedding, QuantizedEmbedding(table, embedding.padding_idx))
    return model


def quantization_targets(model: nn.Module, method_config) -> dict[int, tuple[str, nn.Module]]:
    """id(weight) -> (quantization, module) for every weight ``quantize_base`` quantizes with
    ``method_config``'s settings (a QLoraConfig): every Linear / Conv1D except the output head and
    adapter layers, plus the embedding and the head when quantize_embeddings is on (unset: for
    4-bit where the embedding is a plain nn.Embedding). For sizing and streaming loads, which
    must quantize exactly what ``quantize_base`` would."""
    quantization = method_config.quantization
    embeddings = method_config.quantize_embeddings
    if embeddings is None:
        embeddings = quantization != "int8" and type(model.get_input_embeddings()) is nn.Embedding
    head = model.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    targets = {}
    for name, module in model.named_modules():
        if ".lora_" in f".{name}" or module is head:
            continue
        if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
            targets[id(module.weight)] = (quantization, module)
    if embeddings:
        for module in (model.get_input_embeddings(), head):
            if module is not None:
                targets[id(module.weight)] = (quantization, module)
    return targets


def resolve_compute_dtype(compute_dtype) -> torch.dtype:
    """A dtype or its name; "auto" = what the host probe picks (bf16 only where it is native and
    faster, else fp32: emulated bf16 would make every base matmul hundreds of times slower)."""
    from lorakit.hardware import preferred_compute_dtype

    return preferred_compute_dtype() if compute_dtype == "auto" else resolve_dtype(compute_dtype)


def quantize_base(model: nn.Module, quantization: str = "nf4", compute_dtype="auto",
                  double_quant: bool = True, skip_modules: tuple[str, ...] = ("lm_head",),
                  quantize_embeddings: bool | None = None) -> nn.Module:
    """Replace every Linear / Conv1D of ``model`` (except the output head and ``skip_modules``)
    by a frozen bitsandbytes layer, in place; also the base layers inside LoraLayers.
    ``quantize_embeddings`` (default None: True for nf4 / fp4 where the model's embedding is a
    plain nn.Embedding, else False with a warning; int8: False): quantize the input
    embedding and the output head too (see the module docstring and ``quantize_embedding_and_head``).
    ``compute_dtype``: see ``resolve_compute_dtype``. Returns ``model``. Adapters keep their fp32 weights."""
    if quantization not in QUANT_CHOICES:
        raise LorakitError(f"unknown quantization '{quantization}'; valid choices: {', '.join(QUANT_CHOICES)}")
    compute_dtype = resolve_compute_dtype(compute_dtype)
    base_record(model)  # keep the fingerprint of the weights as loaded: adapters record those, not the 4-bit copy
    strict = quantize_embeddings is not None  # asked for explicitly: an unsupported embedding is an error
    if quantize_embeddings is None:
        quantize_embeddings = quantization != "int8"
    heads = _output_head_ids(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and type(module).__name__ != "Conv1D":
            continue
        if id(module) in heads or any(name == s or name.endswith("." + s) for s in skip_modules):
            continue
        if ".lora_" in f".{name}":  # adapter weights are never quantized
            continue
        targets.append(name)

    for name in targets:
        set_submodule(model, name, quantize_linear(model.get_submodule(name), quantization, compute_dtype, double_quant))
    if quantize_embeddings:
        quantize_embedding_and_head(model, quantization, compute_dtype, double_quant, strict)
    for _, module in model.named_modules():  # a LoraLayer over a Conv1D now wraps a Linear
        if isinstance(module, AdapterLayer) and is_quantized(module.base_layer):
            module.fan_in_fan_out = False
    return model


def _dense_embedding(module: QuantizedEmbedding, dtype: torch.dtype) -> nn.Embedding:
    table = dequantize_weight(module, torch.float32).to(dtype)
    layer = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                         device=table.device, dtype=dtype)
    layer.weight = nn.Parameter(table, requires_grad=False)
    return layer


def dequantize_base(model: nn.Module, dtype=None) -> nn.Module:
    """Replace every quantized layer of ``model`` (also inside LoraLayers) by a dense nn.Linear
    (a QuantizedEmbedding by an nn.Embedding) in ``dtype`` (default: the dtype before
    quantization), in place; layers that shared one quantized weight (a tied embedding and head)
    share one dense weight. Call it before merging to choose the merged model's dtype; merging a
    quantized layer does this by itself."""

    dense_of: dict[int, nn.Parameter] = {}  # id(quantized weight) -> its dense replacement
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        target = resolve_dtype(dtype) if dtype is not None else dense_dtype(module)
        if isinstance(module, QuantizedEmbedding):
            dense = _dense_embedding(module, target)
        else:
            dense = dense_linear(module, torch.float32).to(target)
        shared = dense_of.get(id(module.weight))
        if shared is not None and shared.shape == dense.weight.shape:
            dense.weight = shared
        dense_of.setdefault(id(module.weight), dense.weight)
        replace_module(model, module, dense)
    return model


@dataclass
class BaseWeightMemory:
    """Bytes of the frozen base: quantized layers (codes + quantization state) and dense tensors.

    ``*_bf16_bytes`` say what the same tensors take in bf16, for the ratio QLoRA buys."""

    quantized_bytes: int
    quantized_bf16_bytes: int
    dense_bytes: int
    dense_bf16_bytes: int
    quantized_layers: int

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.dense_bytes

    @property
    def ratio_to_bf16(self) -> float:
        return self.total_bytes / max(1, self.quantized_bf16_bytes + self.dense_bf16_bytes)

    @property
    def quantized_ratio_to_bf16(self) -> float:
        return self.quantized_bytes / max(1, self.quantized_bf16_bytes)

    def summary(self) -> str:
        mib = 1024 ** 2
        line = f"base weights {self.total_bytes / mib:.1f} MiB ({self.ratio_to_bf16:.3f}x of bf16)"
        if self.quantized_layers:
            line += (f"; {self.quantized_layers} quantized layers {self.quantized_bytes / mib:.1f} MiB "
                     f"({self.quantized_ratio_to_bf16:.3f}x of bf16), dense rest {self.dense_bytes / mib:.1f} MiB")
        return line


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor of a bnb layer's quantization state (absmax, code, nested state; int8: SCB,
    which moves from the weight to ``module.state`` after the first forward)."""
    weight = module.weight
    tensors = []
    state = getattr(weight, "quant_state", None)
    while state is not None:
        tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
        state = getattr(state, "state2", None)
    for scb in (getattr(weight, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)):
        if torch.is_tensor(scb):
            tensors.append(scb)
    return tensors


def _dense_numel(module: nn.Module) -> int:
    """How many weights a quantized layer holds (its dense shape's size)."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        return state.shape.numel() if hasattr(state.shape, "numel") else int(torch.Size(state.shape).numel())
    return module.in_features * module.out_features


def base_weight_memory(model: nn.Module) -> BaseWeightMemory:
    """Memory of the base model's weights (adapter tensors excluded; tied tensors counted once)."""
    seen: set[int] = set()

    def once(t: torch.Tensor) -> int:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    quantized = quantized_bf16 = dense = dense_bf16 = layers = 0
    for module in model.modules():
        if is_quantized(module):
            layers += 1
            stored = once(module.weight)
            quantized += stored + sum(once(t) for t in _quant_state_tensors(module))
            if stored:  # a tied embedding / head: one table, counted once in both columns
                quantized_bf16 += _dense_numel(module) * 2
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if ".lora_" in f".{name}" or ".modules_to_save." in name:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if is_quantized(owner) and name.endswith(".weight"):
            continue
        size = once(tensor)
        if size:
            dense += size
            dense_bf16 += tensor.numel() * 2
    return BaseWeightMemory(quantized, quantized_bf16, dense, dense_bf16, layers)
