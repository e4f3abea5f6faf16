"""The method contract, declared: what a training method offers the rest of lorakit.

Three protocols, each the whole of what callers may use (no ``hasattr`` probing elsewhere):

* ``AdaptedModel``: a base causal LM adapted by some method (LoRA and its variants, prefix
  tuning, bottleneck adapters, full fine-tuning, the prompt baseline). The training loop,
  evaluation, checkpoints and the commands use only these members.
* ``AdapterLayer``: a wrapper around one base layer that adds named adapters (LoRA, AdaLoRA,
  bottleneck adapters). ``LoraModel`` manages any layer that follows it.
* ``TrainingHooks``: what a method adds to training (AdaLoRA: a loss regulariser and a rank
  reallocation after each optimizer step), created by ``AdapterMethod.training_hooks``.

The registry entry (``registry.AdapterMethod``) declares which hooks a method has; a method
without a hook leaves that field None and is never asked.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class AdaptedModel(Protocol):
    """A causal LM adapted by one method.

    model: the transformers causal LM inside (config, generation, gradient checkpointing and
      compilation act on it). forward(**batch) -> transformers output with ``loss`` / ``logits``.
    forward_is_inner_model: True when ``self(**batch)`` computes exactly ``self.model(**batch)``
      (the adaptation lives in the inner model's modules), so evaluation may run the inner
      model's decoder and head itself (logits only at labelled positions); False when the
      wrapper changes the computation (prefix tuning's virtual tokens, a training regulariser).
    trainable_tensors(): {stable name: live parameter} of everything the method trains: what a
      checkpoint saves and restores, and what the contract suite checks a step changes.
    save_checkpoint_files(dir) / load_checkpoint_files(dir): the trainable state in a
      checkpoint (exact, for resume); save_pretrained(dir): the method's published files.
    after_optimizer_step(step): called after every optimizer step (1-based step), before zero_grad.
    disable_adapter(): a context in which the model computes the base model exactly.
    """

    model: nn.Module
    forward_is_inner_model: bool

    def forward(self, *args, **kwargs): ...

    def generate(self, *args, **kwargs): ...

    def get_nb_trainable_parameters(self) -> tuple[int, int]: ...

    def trainable_tensors(self) -> dict[str, torch.Tensor]: ...

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None: ...

    def save_checkpoint_files(self, directory: Path) -> None: ...

    def load_checkpoint_files(self, directory: Path) -> None: ...

    def after_optimizer_step(self, global_step: int) -> None: ...

    def disable_adapter(self) -> AbstractContextManager: ...


@runtime_checkable
class AdapterLayer(Protocol):
    """A wrapper around ``base_layer`` holding named adapters (in peft's tables, e.g. ``lora_A``).

    y = base_layer(x) + the active adapters' contributions. ``active_adapters`` are added in
    forward unless ``disable_adapters``; ``merge`` folds them into the base weight and
    ``unmerge`` undoes it (explicit, never a side effect of ``eval()``)."""

    base_layer: nn.Module
    active_adapters: list[str]
    merged_adapters: list[str]
    disable_adapters: bool

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor: ...

    def has_adapter(self, name: str) -> bool: ...

    def delete_adapter(self, name: str) -> None: ...

    def merge(self, adapter_names: list[str] | None = None) -> None: ...

    def unmerge(self) -> None: ...


class TrainingHooks(Protocol):
    """A method's additions to training for one trainable adapter. ``state_dict`` holds what a
    checkpoint needs to continue exactly (tensors, lists, numbers; loaded with weights_only)."""

    def extra_loss(self) -> torch.Tensor: ...

    def update_and_allocate(self, global_step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
