"""Entry points that turn a transformers model into an adapted one.

``get_lora_model`` (alias ``get_peft_model``) freezes the base and injects adapters;
``load_adapter`` wraps a base model with an adapter saved on disk (peft's
``PeftModel.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.models.lora_model import LoraModel


def get_lora_model(model: nn.Module, config, adapter_name: str = "default") -> LoraModel:
    """Freeze ``model``, wrap the layers ``config`` selects, and return the adapted model."""
    return LoraModel(model, config, adapter_name)


get_peft_model = get_lora_model


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                 is_trainable: bool = False) -> LoraModel:
    """Wrap ``model`` with the adapter saved in ``directory`` (peft or lorakit layout)."""
    if isinstance(model, LoraModel):
        model.load_adapter(directory, adapter_name, is_trainable)
        return model
    return LoraModel.from_pretrained(model, directory, adapter_name, is_trainable)
