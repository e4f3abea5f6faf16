"""dtype names as users write them in configs and on the command line (a leaf module)."""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from its name ("bf16", "float32", ...) or a dtype; a one-line error names the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LorakitError(f"unknown dtype '{dtype}'; valid choices: {', '.join(DTYPES)}")
    return DTYPES[dtype]
