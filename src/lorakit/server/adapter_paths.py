"""Which adapter directories a client may ask the server to load at run time, and under what name."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError, lone_surrogate_at
from lorakit.inference.multi_adapter import check_adapter_name
from lorakit.server import protocol
from lorakit.server.protocol import ApiError

_MAX_PATH = 4096  # Linux's PATH_MAX: anything longer cannot name a directory


def check_new_name(name, served: list[str]) -> None:
    """A valid adapter name that is not served yet, else a 400 on ``lora_name``."""
    try:
        check_adapter_name(name)
    except LorakitError as err:
        raise ApiError(400, str(err), param="lora_name") from None
    if name in served:
        raise ApiError(400, f"the name '{name}' is already served; unload it first or choose another",
                       param="lora_name")


def under_root(root: Path | None, path) -> Path:
    """The adapter directory ``path`` names, which must lie inside ``root`` after resolving '..'
    and symlinks (no path traversal), as must every entry directly in it: a symlinked
    adapter_config.json or weights file pointing outside the root would be read from there."""
    if root is None:
        raise ApiError(400, "loading adapters at run time is off; start the server with --adapter-root DIR",
                       param="lora_path")
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > _MAX_PATH \
            or lone_surrogate_at(path) is not None:
        raise ApiError(400, f"'lora_path' must be a directory path inside the adapter root, at most {_MAX_PATH} "
                            f"characters of valid text", param="lora_path")
    root = Path(root).resolve()
    candidate = Path(path)
    shown = protocol.quoted(path)
    outside = ApiError(400, f"'lora_path' must be a directory inside the adapter root; {shown} is not",
                       param="lora_path", code="invalid_path")
    if ".." in candidate.parts:
        raise outside
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise outside
        if not resolved.is_dir():
            raise ApiError(400, f"{shown} is not a directory under the adapter root", param="lora_path")
        escaping = sorted(protocol.quoted(entry.name) for entry in resolved.iterdir()
                          if not entry.resolve().is_relative_to(root))
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop, no permission
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "a symlink loop"
        raise ApiError(400, f"'lora_path' cannot be resolved ({reason})", param="lora_path") from None
    if escaping:
        raise ApiError(400, f"{shown} holds links that lead outside the adapter root ({', '.join(escaping)}); "
                            f"copy the files in instead", param="lora_path", code="invalid_path")
    return resolved
