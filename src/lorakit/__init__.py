"""lorakit: LoRA fine-tuning for causal language models, with peft-compatible adapter files."""

from lorakit.adapters import LoraConfig
from lorakit.errors import LorakitError
from lorakit.models.inject import get_lora_model, get_peft_model, load_adapter
from lorakit.models.load import load_model
from lorakit.models.lora_model import LoraModel

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraModel", "LorakitError", "get_lora_model", "get_peft_model",
           "load_adapter", "load_model", "__version__"]
