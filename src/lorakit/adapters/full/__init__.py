"""Full fine-tuning (``method: full``): every weight of the base (or ``trainable_modules``)
trains; the result is a transformers model directory. The baseline of ``lorakit compare``."""

from lorakit.adapters.full.config import FullConfig
from lorakit.adapters.full.model import FullModel, load_full, wrap_full

__all__ = ["FullConfig", "FullModel", "load_full", "wrap_full"]
