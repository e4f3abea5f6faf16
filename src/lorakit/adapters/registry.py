"""The adapter-method registry: a method is a name, a peft_type, a config class and a
function that attaches one adapter to one base layer.

Adding a method means one folder ``adapters/<method>/`` and one ``register_method`` call in
``adapters/__init__.py``; injection, saving and loading look methods up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class AdapterMethod:
    """name: the training config's ``method:`` value. peft_type: adapter_config.json's value.
    config_class: dataclass with ``from_dict`` / ``to_dict``.
    attach(module, adapter_name, config, module_name) -> nn.Module: wraps ``module`` (or adds
    to an existing wrapper) and returns the module to put in its place.
    layer_types: wrapper classes this method creates (to find them again in a model)."""

    name: str
    peft_type: str
    config_class: type
    attach: Callable[[nn.Module, str, object, str], nn.Module]
    layer_types: tuple[type, ...]


ADAPTER_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> None:
    ADAPTER_METHODS[method.name] = method


def get_method(name: str) -> AdapterMethod:
    if name not in ADAPTER_METHODS:
        raise LorakitError(f"unknown method '{name}'; valid choices: {', '.join(sorted(ADAPTER_METHODS))}")
    return ADAPTER_METHODS[name]


def method_for_config(config) -> AdapterMethod:
    """The registered method whose config class ``config`` is (first registered wins)."""
    for method in ADAPTER_METHODS.values():
        if type(config) is method.config_class:
            return method
    raise LorakitError(f"no registered adapter method uses {type(config).__name__}")


def method_for_peft_type(peft_type: str) -> AdapterMethod:
    for method in ADAPTER_METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({m.peft_type for m in ADAPTER_METHODS.values()})
    raise LorakitError(f"adapter peft_type '{peft_type}' is not supported; lorakit reads {', '.join(known)}")


def all_layer_types() -> tuple[type, ...]:
    return tuple({t for m in ADAPTER_METHODS.values() for t in m.layer_types})
