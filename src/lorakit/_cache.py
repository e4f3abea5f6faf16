"""Where lorakit keeps what it computes once per machine (converted GGUF models, the host probe).

A leaf module (imports nothing of lorakit's) so that ``models/`` and ``hardware`` can share it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of lorakit's cache: $LORAKIT_CACHE or the user cache dir."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("lorakit"))
