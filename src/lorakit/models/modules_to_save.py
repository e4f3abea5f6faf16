"""Fully trainable copies of whole modules (peft's ``modules_to_save``), e.g. a new lm_head.

The original module stays frozen and untouched; each adapter gets its own trainable copy,
used when that adapter is active. In memory: ``<path>.modules_to_save.<adapter>.weight``;
on disk (peft layout): ``<path>.weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    # Per-row module choice for one batch: a callable with the forward's arguments, set by
    # lorakit.inference.mixed inside ``mixed_adapters(...)``; None outside it.
    mixed_batch = None

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        for param in trainable.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = trainable
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def current_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def weight(self) -> torch.Tensor:
        return self.current_module().weight

    def forward(self, *args, **kwargs):
        if self.mixed_batch is not None and not self.disable_adapters:
            return self.mixed_batch(*args, **kwargs)
        return self.current_module()(*args, **kwargs)
