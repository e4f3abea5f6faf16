"""DoRA (Liu et al. 2024): W' = m · (W + s·BA) / ||W + s·BA||_c, a LoRA adapter plus a trainable
per-row magnitude m. Selected with ``LoraConfig(use_dora=True)`` (peft's switch); LoraLayer
calls into ``layer`` for the forward, init and merge of DoRA adapters; the math is in
``functional``."""

from lorakit.adapters.dora.functional import dora_combine, dora_row_norm, row_sq_norm
from lorakit.adapters.dora.layer import (DORA, DoraMagnitude, DoraVariant, dora_forward, dora_merge_delta, dora_unmerge_delta,
                                         init_dora)

__all__ = ["DORA", "DoraMagnitude", "DoraVariant", "dora_combine", "dora_forward", "dora_merge_delta", "dora_row_norm", "dora_unmerge_delta",
           "init_dora", "row_sq_norm"]
