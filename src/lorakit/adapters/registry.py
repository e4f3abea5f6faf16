"""The method registry: every training method is one entry that declares its whole contract.

A method is a name, a config class, how it adapts a base model and how it loads what it saved,
plus the hooks it needs, each a declared field (None / False when the method has none):

    prepare_base(model, config)        change the frozen base before adapting (QLoRA quantizes it)
    training_hooks(layers, name, cfg)  an object adding to the loss / acting after each step (AdaLoRA)
    set_total_steps(config, n)         the run's optimizer-step count, when the method schedules over it
    file_contents(model, name, cfg, publish) -> (config dict, tensors): what the adapter files hold
    report(model)                      one line for the training log (QLoRA: base weight memory)
    eval_context(cfg, data_cfg)        turns placed before every evaluated conversation (the prompt baseline)
    delta_factors(cfg, module, tables) -> (L, R): a saved module's weight update ΔW = L R from its
                                       file tensors by table (LoRA: s·B, A), checking they fit together;
                                       None for a method whose update is not a weight delta (bottleneck, prefix)
    resumable                          checkpoints restore it exactly
    reference                          what preference objectives compare against: "disable_adapter"
                                       (the same model with its adapters off) or "frozen_copy" (a
                                       copy of the base taken before training: full fine-tuning)
    quantized_base                     the run loads its base already quantized, streamed shard by
                                       shard (QLoRA: models.stream_load; the config says how)
    trains                             False for a method with nothing to train (the prompt baseline)

Layer methods (LoRA family, bottleneck adapters) also declare ``attach`` (wrap one base layer),
the wrapper ``layer_types`` and the ``parameter_tables`` their parameters live in (``lora_A`` ...):
those names are how peft's file keys are formed, so a parameter outside them cannot be saved,
and ``LoraModel.save_pretrained`` refuses a trainable parameter that has no file key.

Adding a method touches its folder, one ``register_method`` call in ``adapters/__init__.py`` and
one row of the contract suite (tests/adapters/test_contract.py), which fails without the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class AdapterMethod:
    """One registered method; see the module docstring for each hook.

    name: the training config's ``method:`` value. config_class: a dataclass with ``from_dict`` /
    ``to_dict``. wrap(base, config, adapter_name) -> AdaptedModel (base frozen, method's
    parameters trainable). load(base, directory, adapter_name, is_trainable) -> AdaptedModel.
    peft_type: adapter_config.json's value, None when the method writes no adapter config.
    output: what ``save_pretrained`` publishes: "adapter" (peft files), "model" (a transformers
    directory; the training loop adds the tokenizer) or "prompt" (the prompt baseline's file);
    saved_file: the file that marks a directory as this method's output (``method_for_directory``).
    wrap None: a layer method (``attach``), adapted and loaded by ``lorakit.models.LoraModel``,
    which manages any layers that follow ``contract.AdapterLayer``."""

    name: str
    config_class: type
    wrap: Callable[..., Any] | None = None
    load: Callable[..., Any] | None = None
    peft_type: str | None = None
    attach: Callable[[nn.Module, str, object, str], nn.Module] | None = None
    layer_types: tuple[type, ...] = ()
    parameter_tables: tuple[str, ...] = ()
    prepare_base: Callable[[nn.Module, object], None] | None = None
    training_hooks: Callable[[list, str, object], object] | None = None
    set_total_steps: Callable[[object, int], None] | None = None
    file_contents: Callable[..., tuple[dict, dict]] | None = None
    report: Callable[[nn.Module], str] | None = None
    eval_context: Callable[[object, object], list] | None = None
    delta_factors: Callable[[object, str, dict], tuple] | None = None
    resumable: bool = True
    reference: str = "disable_adapter"
    quantized_base: bool = False
    trains: bool = True
    output: str = "adapter"
    saved_file: str = "adapter_config.json"
    description: str = ""

    def context_for(self, method_config, data_config) -> list:
        """The turns placed before every evaluated conversation (``eval_context``); none by default."""
        return self.eval_context(method_config, data_config) if self.eval_context is not None else []


ADAPTER_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> None:
    ADAPTER_METHODS[method.name] = method


def get_method(name: str) -> AdapterMethod:
    if not isinstance(name, str) or name not in ADAPTER_METHODS:
        raise LorakitError(f"unknown method {name!r}; valid choices: {', '.join(sorted(ADAPTER_METHODS))}")
    return ADAPTER_METHODS[name]


def method_for_config(config) -> AdapterMethod:
    """The registered method whose config class ``config`` is (exact type: QLoraConfig is not
    resolved as LoraConfig)."""
    for method in ADAPTER_METHODS.values():
        if type(config) is method.config_class:
            return method
    raise LorakitError(f"no registered method uses {type(config).__name__}; "
                       f"known configs: {', '.join(m.config_class.__name__ for m in ADAPTER_METHODS.values())}")


def method_for_peft_type(peft_type: str) -> AdapterMethod:
    """The method that reads adapter files of ``peft_type`` (the first registered: LORA -> lora)."""
    for method in ADAPTER_METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({m.peft_type for m in ADAPTER_METHODS.values() if m.peft_type})
    raise LorakitError(f"adapter peft_type {peft_type!r} is not supported; lorakit reads {', '.join(known)}")


def method_for_directory(directory) -> AdapterMethod:
    """The method whose output ``directory`` holds: an adapter_config.json's peft_type first, then
    the other methods' ``saved_file`` (a transformers config.json: full fine-tuning)."""
    directory = Path(directory)
    config = directory / "adapter_config.json"
    if config.is_file():
        try:
            peft_type = json.loads(config.read_text(encoding="utf-8")).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            peft_type = None
        if isinstance(peft_type, str):
            return method_for_peft_type(peft_type)
        raise LorakitError(f"{config}: not an adapter config (no 'peft_type' string)")
    for method in ADAPTER_METHODS.values():
        if method.peft_type is None and (directory / method.saved_file).is_file():
            return method
    others = " or ".join(m.saved_file for m in ADAPTER_METHODS.values() if m.peft_type is None)
    raise LorakitError(f"'{directory}' is not an adapter directory: adapter_config.json is missing "
                       f"(nor is it a lorakit output with {others})")


def all_layer_types() -> tuple[type, ...]:
    return tuple({t for m in ADAPTER_METHODS.values() for t in m.layer_types})


def parameter_tables() -> frozenset[str]:
    """Every adapter table name a registered layer method declares (``lora_A``, ``lora_E`` ...)."""
    return frozenset(t for m in ADAPTER_METHODS.values() for t in m.parameter_tables)
