"""Adapter files on disk, whatever the method: peft's two files, read and written strictly.

    <dir>/adapter_config.json        the method's config + peft_type (+ base_model_name_or_path)
    <dir>/adapter_model.safetensors  the method's tensors under peft's file keys

A leaf module (it imports nothing of lorakit but ``_io`` and ``errors``), so both ``models/``
(``peft_format`` re-exports these names) and a method in ``adapters/`` with its own wrapper
(prefix tuning) read and write adapters the same way. Weights are read from safetensors (a
legacy ``adapter_model.bin`` only with ``weights_only=True``) and must be finite; copying them
onto parameters is strict: every tensor must land on a parameter of the same shape and every
parameter must be in the file; the first mismatch is named in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorakit._io import atomic_path, write_json_atomic
from lorakit.errors import LorakitError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def write_adapter_files(directory: str | Path, config_dict: dict, tensors: dict[str, torch.Tensor],
                        metadata: dict[str, str] | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors atomically; ``metadata``: extra
    string pairs for the safetensors header (the base fingerprint, ``lorakit._fingerprint``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / WEIGHTS_NAME, tensors, metadata)
    write_json_atomic(directory / CONFIG_NAME, config_dict)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written atomically (tensors copied to contiguous CPU memory). Its
    header metadata is ``{"format": "pt"}`` (what transformers expects) plus ``metadata``."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={**(metadata or {}), "format": "pt"})


def read_adapter_metadata(directory: str | Path) -> dict[str, str]:
    """The header metadata of adapter_model.safetensors ({} for a legacy .bin or none); the
    tensors are not read. An unreadable header is the one-line error ``read_tensors`` gives."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise LorakitError(f"{path}: not a valid safetensors file ({err})") from None


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


def read_adapter_weights(directory: str | Path, finite: bool = True) -> dict[str, torch.Tensor]:
    """Tensors from adapter_model.safetensors (or a legacy .bin, loaded with weights_only),
    all finite (``check_finite``; ``finite=False`` leaves that to the caller)."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return read_tensors(path, finite)
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            weights = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad pickles
            raise LorakitError(f"{legacy}: cannot be read safely ({type(err).__name__}: {err})".splitlines()[0]) from None
        return check_finite(weights, str(legacy)) if finite else weights
    raise LorakitError(f"'{directory}' has no {WEIGHTS_NAME}")


def read_tensors(path: str | Path, finite: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file, all finite (unless ``finite=False``); a missing or
    corrupt file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"'{path}' is missing")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LorakitError(f"{path}: not a valid safetensors file ({err})") from None
    return check_finite(weights, str(path)) if finite else weights


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
