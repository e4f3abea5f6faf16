"""One exception type for mistakes a user can fix.

A ``LorakitError`` message is a single line that says what is wrong and what to do
(file and line for data, the tensor name for adapters, the valid choices for config).
The CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib


class LorakitError(ValueError):
    """A user-facing error whose message is one actionable line."""


# Names people bring from papers, peft's docs or transformers' TrainingArguments, mapped to ours.
# Spelling similarity alone gets these wrong ("rank" is closer to "rank_pattern" than to "r").
_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_rank": "r",
    "alpha": "lora_alpha", "scale": "lora_alpha", "scaling": "lora_alpha",
    "dropout": "lora_dropout",
    "target": "target_modules", "targets": "target_modules", "modules": "target_modules",
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "gradient_checkpointing": "grad_checkpointing",
}


def closest_hint(name: str, choices) -> str:
    """Return " (did you mean 'x'?)" for the closest valid choice, or "" when none is close.
    A known alias among ``choices`` wins over spelling similarity."""
    choices = list(choices)
    alias = _ALIASES.get(str(name).lower())
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_key_error(key: str, choices, where: str) -> LorakitError:
    """Error for an unknown config key: names the key, the closest valid one, and all choices."""
    valid = ", ".join(sorted(choices))
    return LorakitError(f"unknown key {key!r} in {where}{closest_hint(str(key), choices)}; valid keys: {valid}")


def lone_surrogate_at(text: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate: from JSON's
    "\\ud800" or undecodable command-line bytes), or None for valid text. No tokenizer takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None
