"""Base fingerprints: an adapter records the base model it was trained on, and loading checks it.

    record = base_record(model)               # computed once, kept on the model
    adapter_base(directory)                   # the BaseRecord an adapter file carries, or None
    require_same_base(directory, model)       # LorakitError saying what differs (serve, merge)

What is recorded and how two bases are compared is ``lorakit._fingerprint`` (a leaf module that
prefix tuning uses too); this module adds the file side. Saving (``LoraModel.save_pretrained``,
prefix tuning, ``inference.blend.save_adapter``) writes the record into the safetensors
metadata. Loading with the library (``load_adapter``) warns (``BaseMismatchWarning``, one line
saying what differs); ``lorakit serve`` and ``lorakit merge`` refuse unless ``--force``. An
adapter without a record (made by peft) loads as before, silently.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit._adapter_files import read_adapter_metadata
from lorakit._fingerprint import (TOLERANCE, BaseMismatchWarning, BaseRecord, base_difference, base_metadata,
                                  base_record, compute_record, forget_record, mismatch_message, warn_if_other_base)
from lorakit.errors import LorakitError

__all__ = ["TOLERANCE", "BaseMismatchWarning", "BaseRecord", "adapter_base", "base_metadata", "base_record",
           "compute_record", "forget_record", "require_same_base", "warn_if_other_base"]

FORCE_HINT = "pass --force to use it anyway"


def adapter_base(directory: str | Path) -> BaseRecord | None:
    """The base record in ``directory``'s adapter_model.safetensors; None when it has none."""
    return BaseRecord.from_metadata(read_adapter_metadata(directory))


def require_same_base(directory: str | Path, model: nn.Module, hint: str = FORCE_HINT) -> None:
    """Refuse (one-line LorakitError ending in ``hint``) an adapter whose recorded base differs
    from ``model``; an adapter without a record passes."""
    found = base_difference(read_adapter_metadata(directory), model)
    if found is not None:
        raise LorakitError(f"{mismatch_message(str(directory), *found, model)}; {hint}")
