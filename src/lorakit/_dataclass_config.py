"""Strict dataclass configs: unknown keys are errors that suggest the closest valid key.

Dataclasses are the single source of truth for every config; this module adds the two
behaviours they lack: a constructor that rejects unknown keyword arguments with a helpful
message, and ``from_dict`` for YAML / JSON input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

from lorakit.errors import LorakitError, unknown_key_error

# Keys peft writes into adapter_config.json that lorakit reads as metadata only.
PEFT_METADATA_KEYS = {"peft_type", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size"}
# Keys of peft features lorakit does not implement: accepted only when switched off.
PEFT_FEATURES_OFF_ONLY = {
    "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "kasa_config",
    "layer_replication", "loftq_config", "lora_bias", "lora_ga_config", "megatron_config",
    "monteclora_config", "target_parameters", "trainable_token_indices", "use_bdlora",
    "use_qalora", "velora_config", "ensure_weight_tying",
}


def is_number(value) -> bool:
    """A finite int or float, not a bool (validators compare it without ``float()``, which raises
    on strings, lists and ints too large for a float; NaN and inf pass no range check people mean)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def check_regex(pattern: str, what: str, template: str = "{}") -> None:
    """A one-line error when ``pattern`` (placed into ``template`` as the matcher uses it) is not
    a valid regular expression, instead of ``re.error`` when the modules are matched."""
    try:
        re.compile(template.format(pattern))
    except (re.error, OverflowError, RecursionError) as err:
        raise LorakitError(f"{what} {pattern!r} is not a valid regular expression ({err})") from None


def check_module_selection(config, where: str) -> None:
    """The fields that choose modules (peft's names and rules, see ``lorakit.models.targets``)
    have the types peft gives them: target_modules / exclude_modules a list of names or one regex,
    layers_to_transform layer indices, layers_pattern a name or a list of names, modules_to_save
    a list of names. Checked here so a wrong type is one line, not a traceback from the matching."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, str):
            check_regex(value, f"{where}.{name}")
        elif value is not None and not _is_names(value):
            raise LorakitError(f"{where}.{name} must be a list of module names or a regex, got {value!r}")
    layers = config.layers_to_transform
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise LorakitError(f"{where}.layers_to_transform must be a list of layer indices (integers >= 0), "
                           f"got {layers!r}")
    pattern = config.layers_pattern
    if pattern is not None and not (isinstance(pattern, str) or _is_names(pattern)):
        raise LorakitError(f"{where}.layers_pattern must be a name or a list of names, got {pattern!r}")
    for part in [pattern] if isinstance(pattern, str) and pattern else pattern or []:
        check_regex(part, f"{where}.layers_pattern", r"(?:^|.*?\.){}\.(\d+)\.")
    if config.modules_to_save is not None and not _is_names(config.modules_to_save):
        raise LorakitError(f"{where}.modules_to_save must be a list of module names, got {config.modules_to_save!r}")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def strict_config(cls):
    """Class decorator for a dataclass: ``cls(bad_key=...)`` raises LorakitError naming the
    closest valid key instead of Python's bare TypeError."""
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        names = field_names(cls)
        for key in kwargs:
            if key not in names:
                raise unknown_key_error(key, names, cls.__name__)
        original_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def peft_config_dict(config) -> dict[str, Any]:
    """adapter_config.json content for a peft-style config dataclass: its fields + peft_type."""
    data = dataclasses.asdict(config)
    data["peft_type"] = config.peft_type
    return data


def peft_config_kwargs(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Constructor kwargs for ``cls`` from a YAML dict or a peft adapter_config.json. Unknown
    keys are errors; peft keys for features lorakit lacks are accepted only when switched off."""
    names = field_names(cls)
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in PEFT_FEATURES_OFF_ONLY:
            if value not in (None, False, {}, []):
                raise LorakitError(f"{where}: peft option '{key}' = {value!r} is not supported by lorakit")
        elif key not in PEFT_METADATA_KEYS:
            raise unknown_key_error(key, names, where)
    return kwargs
