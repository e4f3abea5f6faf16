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
