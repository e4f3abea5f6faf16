"""Load a checkpoint straight into a quantized base (QLoRA), a few rows at a time.

``from_pretrained`` followed by ``quantize_base`` holds the whole dense model first: a 3B model
in fp32 is 13 GB before it becomes 1.7 GB of NF4. Here the model is built with its parameters
on the meta device (no memory; buffers such as rotary frequencies are real), then the
safetensors shards are read tensor by tensor (memory-mapped). A 4-bit target that is a linear
weight or an embedding table is quantized as its rows arrive, a chunk of rows at a time
(``adapters.qlora.streamed``: the same codes as quantizing it whole), so not even one dense
matrix is held whole; the layer is built once its bias has arrived too, the embedding (and the
head, the same table when tied) once both have. Other targets (GPT-2's transposed Conv1D, int8
layers) arrive whole and are quantized at once; every other tensor (norms) is placed as it is.
Peak memory is the quantized model plus one chunk of dense rows: measured on a Llama-3.2-3B-shaped
model (bf16 shards, 6.4 GB; NF4 base 1.54 GiB), 2.06 GiB peak RSS during the load (0.31 GiB of it
Python and libraries), against 5.57 GiB when each tensor arrived whole (the 1.5 GiB fp32
embedding table and bitsandbytes' temporaries of its size).

The result is the model ``quantize_base`` would make from a dense load of the same checkpoint,
to the bit (tested): the same layers quantized by the same rules (every Linear / Conv1D except
the output head, plus the embedding and head per ``quantize_embeddings``) from the same values
in the same dtype. Its base fingerprint (``_fingerprint``) is computed from the dense values as
they stream in (only the ends of each sampled matrix are read), so adapters record the
checkpoint as loaded, exactly as after a dense load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit._fingerprint import SLICE, compute_record, keep_record
from lorakit._modules import set_submodule
from lorakit.errors import LorakitError


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise LorakitError(f"'{directory}' has no model.safetensors (or index): QLoRA's streaming load reads "
                       f"safetensors checkpoints only")


def _key_index(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                where[key] = path
    return where


def _checkpoint_name(model: nn.Module, name: str, keys: dict[str, Path]) -> str:
    """The checkpoint key of parameter ``name`` (some checkpoints lack the base-model prefix)."""
    if name in keys:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    short = name.removeprefix(prefix + ".") if prefix else name
    if short in keys:
        return short
    raise LorakitError(f"the checkpoint has no tensor for '{name}'; it does not match the model's config")


def _read(path: Path, key: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of a shard, copied out of the memory map in ``dtype``: a tensor still backed by
    the map would keep the file's pages resident (counted in RSS) for as long as the map lives."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensor = handle.get_tensor(key)
        return tensor.to(dtype, copy=True)


def _read_rows(path: Path, key: str, dtype: torch.dtype, device):
    """``read_rows(start, stop)`` -> rows start..stop of a 2-D tensor of a shard, in ``dtype`` on
    ``device``: only those rows are copied out of the memory map."""
    from safetensors import safe_open

    def read_rows(start: int, stop: int) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_slice(key)[start:stop].to(device=device, dtype=dtype, copy=True)

    return read_rows


def _read_ends(path: Path, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The flattened first and last SLICE values of a tensor (all of it when small): what the
    base fingerprint reads, without copying a whole embedding table out of the shard."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        part = handle.get_slice(key)
        shape = part.get_shape()
        if len(shape) != 2 or shape[0] * shape[1] <= 2 * SLICE:
            return handle.get_tensor(key).to(dtype, copy=True)
        rows = -(-SLICE // shape[1])  # whole rows holding SLICE values
        return torch.cat([part[:rows].reshape(-1)[:SLICE], part[shape[0] - rows:].reshape(-1)[-SLICE:]]).to(dtype)


def _release_freed_memory() -> None:
    """Give the pages of freed dense tensors back to the system (glibc ``malloc_trim``): after
    its first large free, glibc serves tensors of a few MB from its heap, where freed dense
    weights sit between live 4-bit ones and would stay resident. No-op elsewhere."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _place(module: nn.Module, attribute: str, tensor: torch.Tensor) -> None:
    module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)


def load_quantized(source: str, recorded_name: str, qlora_config, dtype: torch.dtype, device="cpu") -> nn.Module:
    """The model of directory ``source`` on ``device`` with its base quantized as ``qlora_config``
    says (module docstring); dense tensors (norms, biases, unquantized embeddings) in ``dtype``.
    Every tensor is placed on ``device`` before it is quantized (bitsandbytes quantizes where the
    weight is; moving a quantized int8 layer afterwards would quantize it again). The allocator
    policy (``load_model``'s ``compact_memory``) is set before this runs."""
    return _load(Path(source), recorded_name, qlora_config, dtype, device)


def _quantized_by_rows(param: torch.Tensor, targets: dict, qlora_config) -> bool:
    """Whether a parameter is quantized as its rows stream in (``quantize_4bit_by_rows``): a 4-bit
    target that is an nn.Linear weight (out, in) or an nn.Embedding table. GPT-2's Conv1D stores
    W transposed, and int8 quantizes per row of the whole matrix: those arrive whole."""
    quantization, module = targets.get(id(param), (None, None))
    return quantization in ("nf4", "fp4") and type(module) in (nn.Linear, nn.Embedding) and param.dim() == 2


def _load(directory: Path, recorded_name: str, qlora_config, dtype: torch.dtype, device) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.adapters.qlora.base import (quantization_targets, quantize_embedding_and_head, quantize_linear,
                                             resolve_compute_dtype)
    from lorakit.adapters.qlora.streamed import quantize_4bit_by_rows

    files = _shard_files(directory)
    keys = _key_index(files)
    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model.name_or_path = recorded_name
    model.config.name_or_path = recorded_name
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    params = dict(model.named_parameters())
    names = {name: _checkpoint_name(model, name, keys) for name in params}
    keep_record(model, compute_record(model, loaded=lambda name: _read_ends(keys[names[name]], names[name], dtype)))

    compute = resolve_compute_dtype(qlora_config.compute_dtype)
    targets = quantization_targets(model, qlora_config)  # id(weight) -> (kind, module): what to quantize
    tables = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None} & set(targets)
    # a quantized linear layer waits for all of its own tensors (weight, bias); the tables for each other
    waiting = {name: {n for n, _ in module.named_parameters(recurse=False)} for name, module in model.named_modules()
               if id(getattr(module, "weight", None)) in targets and id(module.weight) not in tables}
    tables_waiting = {name for name, p in params.items() if id(p) in tables}
    by_rows = {name for name, p in params.items() if _quantized_by_rows(p, targets, qlora_config)}
    del targets  # it holds the skeleton's modules, which would keep every placed dense weight alive
    for path in files:
        for name in [n for n in params if keys[names[n]] == path]:
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name in by_rows:  # 4-bit from the start: never the whole dense matrix in memory
                module._parameters[attribute] = quantize_4bit_by_rows(
                    _read_rows(path, names[name], dtype, device), tuple(params[name].shape), dtype,
                    qlora_config.quantization, qlora_config.double_quant)
            else:
                _place(module, attribute, _read(path, names[name], dtype).to(device))
            pending = waiting.get(module_name)
            if pending is not None:
                pending.discard(attribute)
                if not pending:
                    del waiting[module_name]
                    set_submodule(model, module_name, quantize_linear(module, qlora_config.quantization, compute,
                                                                      qlora_config.double_quant, consume=True))
                    del module
                    _release_freed_memory()
            if name in tables_waiting:
                tables_waiting.discard(name)
                if not tables_waiting:
                    model.tie_weights()  # a tied head reads the table just placed
                    quantize_embedding_and_head(model, qlora_config.quantization, compute, qlora_config.double_quant,
                                                consume=True)
                    _release_freed_memory()
    model.tie_weights()  # a tied head still points at the skeleton's table when the table stayed dense
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LorakitError(f"the checkpoint in '{directory}' left '{missing[0]}' unloaded; it does not match its config")
    model.eval()
    return model
