"""Adapter files in peft's exact layout, so adapters move between lorakit, peft,
transformers and vLLM with no converter.

    <dir>/adapter_config.json        the method's config + peft_type (+ base_model_name_or_path)
    <dir>/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight, .lora_B.weight, ...

In-memory names carry the adapter name (``q_proj.lora_A.default.weight``) and wrapper infixes
(``base_layer``, ``modules_to_save.default``); file names drop them, as peft does. Loading is
strict: every tensor in the file must land on a parameter of the same shape and every adapter
parameter must be in the file; the first mismatch is named in the error. Weights are read
from safetensors (a legacy ``adapter_model.bin`` only with ``weights_only=True``) and must be
finite. Every reader of an adapter (load, generate, eval, merge, serve, info) goes through
``adapter_config_from_dict`` and ``read_adapter_weights``, so all accept and refuse the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit import _file_keys
from lorakit._file_keys import FILE_PREFIX
from lorakit._io import atomic_path, write_json_atomic
from lorakit.adapters import method_for_peft_type, parameter_tables
from lorakit.errors import LorakitError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
__all__ = ["FILE_PREFIX", "file_key"]  # and the readers / writers below


def file_key(model_key: str, adapter_name: str) -> str | None:
    """peft's file name of an in-memory adapter parameter, or None when it is not one of
    ``adapter_name``'s (see ``lorakit._file_keys``; the tables are those registered methods declare)."""
    return _file_keys.file_key(model_key, adapter_name, parameter_tables())


def write_adapter_files(directory: str | Path, config_dict: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json and adapter_model.safetensors atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_NAME, config_dict)


def read_adapter_config_dict(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise LorakitError(f"adapter directory '{directory}' does not exist")
    if not path.is_file():
        raise LorakitError(f"'{directory}' is not an adapter directory: {CONFIG_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path}: not UTF-8 text (byte {err.start}); it is damaged, save the adapter "
                           f"again") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise LorakitError(f"{path}: not an adapter config (no 'peft_type' key)")
    return data


def adapter_config_from_dict(data: dict, directory: str | Path):
    """The config object of the adapter's method built from its adapter_config.json dict, which
    checks types, ranges and unknown keys (``"r": "16"`` is refused here, for every command)."""
    method = method_for_peft_type(data["peft_type"])
    return method.config_class.from_dict(data, where=str(Path(directory) / CONFIG_NAME))


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from adapter_model.safetensors (or a legacy .bin, loaded with weights_only),
    all finite (``check_finite``)."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise LorakitError(f"{path}: not a valid safetensors file ({err})") from None
        return check_finite(weights, str(path))
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            weights = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles
            raise LorakitError(f"{legacy}: cannot be read safely ({type(err).__name__}: {err})".splitlines()[0]) from None
        return check_finite(weights, str(legacy))
    raise LorakitError(f"'{directory}' has no {WEIGHTS_NAME}")


def check_finite(weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Return ``weights`` when every floating-point tensor is finite; otherwise a one-line error
    naming the first tensor with NaN or Inf (the adapter of a diverged run would only produce
    NaN logits, empty generations and a NaN merged model)."""
    for key, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        values = tensor if tensor.element_size() >= 2 else tensor.float()  # float8: isfinite needs a wider type
        if not bool(torch.isfinite(values).all()):
            counts = {"NaN": int(torch.isnan(values).sum()), "Inf": int(torch.isinf(values).sum())}
            found = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
            raise LorakitError(f"{source}: tensor '{key}' holds non-finite values ({found} of {values.numel()}); "
                               f"the adapter is unusable (did training diverge?): retrain it, e.g. with a lower lr")
    return weights


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


@torch.no_grad()
def copy_into_model(expected: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor],
                    source: str) -> None:
    """Copy file tensors onto parameters; any unexpected, missing or misshapen tensor is an error."""
    for key, tensor in weights.items():
        if key not in expected:
            raise LorakitError(f"{source}: tensor '{key}' does not match any adapter parameter of this "
                               f"model (adapter made for another architecture or target set?)")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LorakitError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)} but the model "
                               f"expects {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in weights]
    if missing:
        raise LorakitError(f"{source}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    for key, tensor in weights.items():
        param = expected[key]
        param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
