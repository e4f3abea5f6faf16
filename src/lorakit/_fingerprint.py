"""Base fingerprints: which base model an adapter was trained on, recorded in its file's metadata.

A leaf module (imports nothing of lorakit), so layer methods managed by ``models/`` and methods
with their own wrapper in ``adapters/`` (prefix tuning) record and check the same way. An
adapter's ``adapter_model.safetensors`` carries string metadata (peft, vLLM and transformers
ignore keys they do not know, so the files stay loadable untouched):

    lorakit.base.name          the base's name_or_path, as given when it was loaded
    lorakit.base.architecture  config.architectures[0] (else the class name) and model_type
    lorakit.base.shapes        "<n> tensors, <N> values, sha256 <16 hex>" over every parameter's name and shape
    lorakit.base.config        sha256 of the config fields shapes do not show (activation, norm
                               epsilon, rotary theta / type / factor, tied embeddings)
    lorakit.base.fingerprint   sha256 of those config fields and the sampled weights v below
    lorakit.base.sketch        the sampled weights themselves (bf16, base64; ~2.7 KB)

The sample: of the K = 8 matrices (parameters with >= 2 dims, sorted by name, evenly spaced,
first and last included), v_i = the first 64 and last 64 values of the flattened tensor as
loaded, rounded to bf16. So a fp32 and a bf16 load of one checkpoint give the same fingerprint
(bf16(fp32 x) is what a bf16 load holds, and bf16(bf16 x) = bf16 x). A fp16 load rounds twice
(fp32 -> fp16 -> bf16) and may land one bf16 ulp away (at most 2^-7·|x|), so fingerprints are
compared exactly and, when they differ, the sketches with a tolerance: two records describe the
same base when the fingerprints are equal, or when the configs are equal and every sampled
matrix agrees within ||v_a - v_b|| <= 2^-7·max(||v_a||, ||v_b||) (guaranteed for any mix of
fp32, bf16 and fp16 loads of one checkpoint, by the one-ulp bound). A random model of the same
shapes is ~1.4 away, a 4-bit quantized copy (GGUF Q4, NF4) ~0.1: both count as other weights,
as does a fine-tune whose sampled weights moved more than ~0.8% (rms).

Computed once per model, in milliseconds (16 slices and the parameter names), and kept on the
model (``base_record``): ``LoraModel`` computes it when the first adapter is added, before
QLoRA quantizes the base or PiSSA rewrites it, and ``quantize_base`` before quantizing, so an
adapter always records (and is checked against) the base as it was loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

PREFIX = "lorakit.base."
_ATTR = "_lorakit_base_record"  # where a model keeps its record (instance __dict__)
SAMPLED = 8      # matrices sampled for the fingerprint and the sketch
SLICE = 64       # values taken from each end of a sampled matrix
TOLERANCE = 2.0 ** -7  # sketch agreement, relative to ||v|| (see module docstring)


class BaseMismatchWarning(UserWarning):
    """An adapter is loaded on a base model other than the one its fingerprint records."""


@dataclass(frozen=True)
class BaseRecord:
    """A base model's identity; see the module docstring for each field. sketch: per sampled
    matrix, its values v as bf16 bytes (little-endian)."""

    name: str
    architecture: str
    shapes: str
    config: str
    fingerprint: str
    sketch: tuple[bytes, ...]

    def to_metadata(self) -> dict[str, str]:
        sketch = ";".join(base64.b64encode(row).decode("ascii") for row in self.sketch)
        return {PREFIX + "name": self.name, PREFIX + "architecture": self.architecture, PREFIX + "shapes": self.shapes,
                PREFIX + "config": self.config, PREFIX + "fingerprint": self.fingerprint, PREFIX + "sketch": sketch}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> "BaseRecord | None":
        """The record in an adapter file's metadata; None when it has none (a peft-made adapter)
        or an unreadable one (a record we cannot read proves nothing either way)."""
        metadata = metadata or {}
        if PREFIX + "fingerprint" not in metadata:
            return None
        try:
            sketch = tuple(base64.b64decode(row, validate=True) for row in metadata[PREFIX + "sketch"].split(";"))
            return cls(metadata[PREFIX + "name"], metadata[PREFIX + "architecture"], metadata[PREFIX + "shapes"],
                       metadata[PREFIX + "config"], metadata[PREFIX + "fingerprint"], sketch)
        except (KeyError, ValueError):  # binascii.Error is a ValueError
            return None

    def difference(self, other: "BaseRecord") -> str | None:
        """What differs between the base this record describes and ``other`` (one clause), or
        None when they are the same model (see the module docstring for what "same" means)."""
        if self.architecture != other.architecture:
            return f"architecture {self.architecture}, not {other.architecture}"
        if self.shapes != other.shapes:
            return f"parameter shapes differ ({self.shapes}; this base: {other.shapes})"
        if self.fingerprint == other.fingerprint:
            return None
        if self.config != other.config:
            return "config differs (activation, norm epsilon, rotary settings or tied embeddings)"
        distance = sketch_distance(self.sketch, other.sketch)
        if distance <= TOLERANCE:
            return None  # the same weights at another precision
        return f"same shapes but other weights (relative distance {distance:.3g})"


def sketch_distance(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> float:
    """max over sampled matrices of ||v_a - v_b|| / max(||v_a||, ||v_b||); inf when the
    sketches do not line up (then they are not of one set of shapes)."""
    if len(a) != len(b) or any(len(x) != len(y) or len(x) % 2 for x, y in zip(a, b)):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        va, vb = _from_bf16_bytes(x), _from_bf16_bytes(y)
        scale = max(float(va.norm()), float(vb.norm()))
        if scale > 0:
            worst = max(worst, float((va - vb).norm()) / scale)
    return worst


def _from_bf16_bytes(data: bytes) -> torch.Tensor:
    """bf16 values stored little-endian (as ``compute_record`` writes them) -> fp64 tensor."""
    import numpy as np

    return torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16)).view(torch.bfloat16).double()


# --- computing ------------------------------------------------------------------------------
def base_record(model: nn.Module) -> BaseRecord:
    """The model's record: the one kept on it, else computed now and kept (so later changes to
    its weights by QLoRA or PiSSA do not change it)."""
    record = model.__dict__.get(_ATTR)
    if record is None:
        record = compute_record(model)
        model.__dict__[_ATTR] = record
    return record


def forget_record(model: nn.Module) -> None:
    """Drop the kept record (after a merge changed the weights for good)."""
    model.__dict__.pop(_ATTR, None)


def base_metadata(model: nn.Module) -> dict[str, str]:
    """The metadata an adapter trained on ``model`` records."""
    return base_record(model).to_metadata()


def keep_record(model: nn.Module, record: BaseRecord) -> None:
    """Keep ``record`` on ``model`` as its record (a model loaded already quantized, whose dense
    weights were only ever seen while streaming them in)."""
    model.__dict__[_ATTR] = record


@torch.no_grad()
def compute_record(model: nn.Module, loaded=None) -> BaseRecord:
    """A fresh record of ``model`` (see the module docstring). ``loaded``: name -> the tensor as
    loaded, for a model whose parameters are not (yet) those values (a weightless skeleton while
    a checkpoint streams in), or any tensor whose flattened first and last SLICE values are the
    loaded tensor's (its ends are all the record reads); by default the parameters themselves."""
    config = getattr(model, "config", None)
    params = dict(sorted(model.named_parameters()))
    shapes = hashlib.sha256("\n".join(f"{n}:{tuple(p.shape)}" for n, p in params.items()).encode())
    shapes_line = (f"{len(params)} tensors, {sum(p.numel() for p in params.values())} values, "
                   f"sha256 {shapes.hexdigest()[:16]}")
    config_text = json.dumps(_config_fields(config), sort_keys=True, default=str)
    digest = hashlib.sha256(config_text.encode())
    sketch = []
    for name in _sampled(params):
        flat = (loaded(name) if loaded is not None else params[name]).detach().reshape(-1)
        if flat.is_meta:  # a model built without weights (lorakit estimate sizes one): no values to sketch
            continue
        values = torch.cat([flat[:SLICE], flat[-SLICE:]]).to("cpu", torch.float32).to(torch.bfloat16)  # (128,) v
        row = values.view(torch.int16).numpy().astype("<i2").tobytes()
        digest.update(name.encode() + b"\0" + row)
        sketch.append(row)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    model_type = getattr(config, "model_type", None)
    return BaseRecord(
        name=str(getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", "") or ""),
        architecture=f"{architectures[0]} ({model_type})" if model_type else str(architectures[0]),
        shapes=shapes_line, config=hashlib.sha256(config_text.encode()).hexdigest()[:16],
        fingerprint=digest.hexdigest()[:16], sketch=tuple(sketch))


def _sampled(params: dict[str, torch.Tensor]) -> list[str]:
    """SAMPLED names of matrices, evenly spaced in name order, first and last included (any
    parameters when none is a matrix)."""
    names = [n for n, p in params.items() if p.dim() >= 2 and p.numel() > 0] or \
            [n for n, p in params.items() if p.numel() > 0]
    if len(names) <= SAMPLED:
        return names
    return [names[round(i * (len(names) - 1) / (SAMPLED - 1))] for i in range(SAMPLED)]


def _config_fields(config) -> dict:
    """The config values that change what a base computes but not its shapes, under one set of
    names whatever the transformers version calls them (rope_theta moved into rope_parameters)."""
    if config is None:
        return {}

    def first(*names):
        return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

    rope = first("rope_parameters", "rope_scaling")
    rope = rope if isinstance(rope, dict) else {}
    theta = rope.get("rope_theta", first("rope_theta"))
    factor = rope.get("factor")
    return {
        "model_type": getattr(config, "model_type", None),
        "activation": first("hidden_act", "activation_function", "hidden_activation"),
        "norm_eps": _number(first("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")),
        "rope_theta": _number(theta),
        "rope_type": rope.get("rope_type", rope.get("type")),
        "rope_factor": _number(factor),
        "tie_word_embeddings": getattr(config, "tie_word_embeddings", None),
    }


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# --- checking -------------------------------------------------------------------------------
def base_difference(metadata: dict[str, str] | None, model: nn.Module) -> tuple[BaseRecord, str] | None:
    """(the recorded base, what differs) when ``metadata`` records a base other than ``model``;
    None when it records ``model`` or nothing at all."""
    recorded = BaseRecord.from_metadata(metadata)
    if recorded is None:
        return None
    difference = recorded.difference(base_record(model))
    return None if difference is None else (recorded, difference)


def mismatch_message(source: str, recorded: BaseRecord, difference: str, model: nn.Module) -> str:
    """One line: that the adapter at ``source`` was trained on another base (named when known) and what differs."""
    names = [f"'{recorded.name}'" if recorded.name else "", base_record(model).name]
    named = f" ({names[0]}, not '{names[1]}')" if all(names) else f" ({names[0]})" if names[0] else ""
    return f"{source}: adapter trained on another base model{named}: {difference}"


def warn_if_other_base(metadata: dict[str, str] | None, model: nn.Module, source: str) -> None:
    """The library's check on loading: a BaseMismatchWarning saying what differs, else nothing."""
    found = base_difference(metadata, model)
    if found is not None:
        warnings.warn(mismatch_message(source, *found, model), BaseMismatchWarning, stacklevel=3)
