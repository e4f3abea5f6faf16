"""Prefix tuning (Li & Liang 2021): P trained key/value vectors before every sequence, in every
attention layer, of a frozen causal LM. peft's PREFIX_TUNING files, read and written as peft does.

    config.py   PrefixTuningConfig (peft's names; shapes filled from the model)
    encoder.py  the prefix encoder (flat table or projection MLP) and the prefix as a KV cache
    model.py    PrefixModel (the AdaptedModel), wrap_prefix / load_prefix for the registry
"""

from lorakit.adapters.prefix.config import PrefixTuningConfig
from lorakit.adapters.prefix.model import PrefixModel, load_prefix, wrap_prefix

__all__ = ["PrefixModel", "PrefixTuningConfig", "load_prefix", "wrap_prefix"]
