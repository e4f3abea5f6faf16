"""lorakit: LoRA fine-tuning for causal language models, with peft-compatible adapter files.

The public names below are imported on first use (PEP 562), so ``import lorakit`` and the
``lorakit --help`` command do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoraConfig": "lorakit.adapters",
    "AdaLoraConfig": "lorakit.adapters.adalora",
    "BottleneckConfig": "lorakit.adapters.bottleneck",
    "QLoraConfig": "lorakit.adapters.qlora",
    "PrefixTuningConfig": "lorakit.adapters.prefix",
    "FullConfig": "lorakit.adapters.full",
    "PromptConfig": "lorakit.adapters.prompt",
    "LoraModel": "lorakit.models.lora_model",
    "LorakitError": "lorakit.errors",
    "get_lora_model": "lorakit.models.inject",
    "get_peft_model": "lorakit.models.inject",
    "load_adapter": "lorakit.models.inject",
    "load_model": "lorakit.models.load",
}

__all__ = ["AdaLoraConfig", "BottleneckConfig", "FullConfig", "LoraConfig", "PrefixTuningConfig", "PromptConfig",
           "QLoraConfig", "LoraModel", "LorakitError",
           "get_lora_model", "get_peft_model", "load_adapter", "load_model", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
