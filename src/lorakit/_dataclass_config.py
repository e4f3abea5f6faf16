"""Strict dataclass configs: unknown keys are errors that suggest the closest valid key.

Dataclasses are the single source of truth for every config; this module adds the two
behaviours they lack: a constructor that rejects unknown keyword arguments with a helpful
message, and ``from_dict`` for YAML / JSON input.
"""

from __future__ import annotations

import dataclasses
import functools

from lorakit.errors import unknown_key_error


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
