"""Adapter files in peft's exact layout, so adapters move between lorakit, peft,
transformers and vLLM with no converter.

    <dir>/adapter_config.json        the method's config + peft_type (+ base_model_name_or_path)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight, .lora_B.weight, ...
                                     (metadata: "format": "pt" and lorakit's base fingerprint, models/fingerprint.py)

In-memory names carry the adapter name (``q_proj.lora_A.default.weight``) and wrapper infixes
(``base_layer``, ``modules_to_save.default``); file names drop them, as peft does. Loading is
strict: every tensor in the file must land on a parameter of the same shape and every adapter
parameter must be in the file; the first mismatch is named in the error. Weights are read
from safetensors (a legacy ``adapter_model.bin`` only with ``weights_only=True``) and must be
finite. Every reader of an adapter (load, generate, eval, merge, serve, info) goes through
``adapter_config_from_dict`` and ``read_adapter_weights``, so all accept and refuse the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit import _file_keys
# the file readers and writers live in a leaf module that methods with their own wrapper share
from lorakit._adapter_files import (CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, check_finite, copy_into_model,
                                    read_adapter_config_dict, read_adapter_metadata, read_adapter_weights,
                                    write_adapter_files)
from lorakit._file_keys import FILE_PREFIX
from lorakit.adapters import method_for_peft_type, parameter_tables

__all__ = ["CONFIG_NAME", "FILE_PREFIX", "LEGACY_WEIGHTS_NAME", "WEIGHTS_NAME", "adapter_config_from_dict",
           "adapter_tensors", "check_finite", "copy_into_model", "file_key", "read_adapter_config_dict",
           "read_adapter_metadata", "read_adapter_weights", "write_adapter_files"]


def file_key(model_key: str, adapter_name: str) -> str | None:
    """peft's file name of an in-memory adapter parameter, or None when it is not one of
    ``adapter_name``'s (see ``lorakit._file_keys``; the tables are those registered methods declare)."""
    return _file_keys.file_key(model_key, adapter_name, parameter_tables())


def adapter_config_from_dict(data: dict, directory: str | Path):
    """The config object of the adapter's method built from its adapter_config.json dict, which
    checks types, ranges and unknown keys (``"r": "16"`` is refused here, for every command)."""
    method = method_for_peft_type(data["peft_type"])
    return method.config_class.from_dict(data, where=str(Path(directory) / CONFIG_NAME))


def adapter_tensors(model: torch.nn.Module, adapter_name: str, bias: str = "none",
                    adapter_layer_types: tuple = ()) -> dict[str, torch.nn.Parameter]:
    """{file key: in-memory parameter} for one adapter of a wrapped transformers model.

    bias="all" adds every bias; "lora_only" adds the biases of adapted layers (peft names
    these with the wrapper infix: ``<path>.c_attn.base_layer.bias``)."""
    tensors = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = file_key(name, adapter_name)
        if key is not None:
            tensors[key] = param
    if bias != "none":
        adapted = {n for n, m in model.named_modules() if isinstance(m, adapter_layer_types)}
        for name, param in model.named_parameters():
            owner = name.rsplit(".", 1)[0].replace(".base_layer", "")
            if name.endswith("bias") and (bias == "all" or owner in adapted) and "lora_" not in name:
                tensors[FILE_PREFIX + name] = param  # peft keeps ".base_layer." in bias names
    return tensors
