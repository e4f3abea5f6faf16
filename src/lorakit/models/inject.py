"""Entry points that turn a transformers model into an adapted one, for every registered method.

``get_lora_model`` (alias ``get_peft_model``) freezes the base and adapts it with the method
the config belongs to; ``load_adapter`` wraps a base model with what a method saved
(peft's ``PeftModel.from_pretrained``). Layer methods (LoRA, QLoRA, AdaLoRA) are managed by
``LoraModel``; a method with its own wrapper declares ``wrap`` / ``load`` in the registry.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.adapters import method_for_config, method_for_directory
from lorakit.errors import LorakitError
from lorakit.models.lora_model import LoraModel


def get_lora_model(model: nn.Module, config, adapter_name: str = "default"):
    """Freeze ``model``, adapt it as ``config``'s method does, and return the AdaptedModel."""
    method = method_for_config(config)
    if method.wrap is not None:
        return method.wrap(model, config, adapter_name)
    return LoraModel(model, config, adapter_name)


get_peft_model = get_lora_model


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False):
    """Wrap ``model`` with what a method saved in ``directory`` (peft or lorakit layout): the
    method is the one its adapter_config.json's ``peft_type`` names, else the one whose
    ``saved_file`` it holds (``registry.method_for_directory``)."""
    if isinstance(model, LoraModel):
        model.load_adapter(directory, adapter_name, is_trainable)
        return model
    if not Path(directory).is_dir():
        raise LorakitError(f"adapter directory '{directory}' does not exist")
    method = method_for_directory(directory)
    if method.load is not None:
        return method.load(model, directory, adapter_name, is_trainable)
    return LoraModel.from_pretrained(model, directory, adapter_name, is_trainable)
