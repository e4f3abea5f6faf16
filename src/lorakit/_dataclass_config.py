"""Strict dataclass configs: unknown keys are errors that suggest the closest valid key.

Dataclasses are the single source of truth for every config; this module adds the two
behaviours they lack: a constructor that rejects unknown keyword arguments with a helpful
message, and ``from_dict`` for YAML / JSON input.
"""

from __future__ import annotations

import dataclasses
import functools
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
