"""Module-tree helpers that adapter layers and model wrappers share (a leaf module: imports
nothing of lorakit, so ``adapters`` and ``models`` both use it and imports flow one way)."""

from __future__ import annotations

import re

from torch import nn


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``root`` ("model.layers.0.mlp.up_proj")."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits in ``root`` (every path: a tied module may sit twice)."""
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if module is old and name:
            set_submodule(root, name, new)


def name_matches(patterns: list[str] | str, name: str) -> bool:
    """peft's rule: regex string -> fullmatch; list -> exact name or '.'-suffix match."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_value(patterns: dict, module_name: str, default):
    """Per-module override from rank_pattern / alpha_pattern (peft: key is a name suffix or regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def inner_model_getattr(self, name: str):
    """``__getattr__`` of the adapted-model wrappers: their own attributes, else the wrapped
    transformers model's (``config``, ``device``, ...), as peft's models fall through."""
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        if name == "model":
            raise
        return getattr(self.model, name)


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, peft's ``get_nb_trainable_parameters``."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def trainable_parameters_line(module: nn.Module) -> str:
    """peft's ``print_trainable_parameters`` line (printed and returned)."""
    trainable, total = parameter_counts(module)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line
