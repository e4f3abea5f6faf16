"""One exception type for mistakes a user can fix.

A ``LorakitError`` message is a single line that says what is wrong and what to do
(file and line for data, the tensor name for adapters, the valid choices for config).
The CLI prints it without a traceback.
"""

from __future__ import annotations

import difflib


class LorakitError(ValueError):
    """A user-facing error whose message is one actionable line."""


def closest_hint(name: str, choices) -> str:
    """Return " (did you mean 'x'?)" for the closest valid choice, or "" when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_key_error(key: str, choices, where: str) -> LorakitError:
    """Error for an unknown config key: names the key, the closest valid one, and all choices."""
    valid = ", ".join(sorted(choices))
    return LorakitError(f"unknown key '{key}' in {where}{closest_hint(key, choices)}; valid keys: {valid}")
