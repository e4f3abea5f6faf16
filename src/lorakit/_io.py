"""Atomic file writes: a reader never sees a half-written file.

Each writer writes to a temporary file in the destination directory, flushes it to disk,
then renames it over the target (rename is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorakit._faults import fault_point
from lorakit.errors import LorakitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        fault_point("atomic-write")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | os.PathLike, data) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary directory next to ``target``; on success it replaces ``target``
    (an existing directory or file is moved aside first and removed afterwards). It replaces
    whatever is there: callers that must not lose data check with ``check_output_target`` first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        fault_point("atomic-dir")
        old = None
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a directory tree (best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_directory_path(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Raise a one-line LorakitError when ``path`` or one of its parents exists but is not a
    directory (a file, a dangling symlink), so ``mkdir`` cannot fail deep inside a run.
    Returns ``path`` as a Path."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise LorakitError(f"{what} '{path}' is an existing file, not a directory; choose another {what}")
    _check_parents(path, what)
    return path


def _check_parents(path: Path, what: str) -> None:
    for parent in path.parents:
        if os.path.lexists(parent) and not parent.is_dir():
            raise LorakitError(f"{what} '{path}' is inside '{parent}', which is a file, not a directory; "
                               f"choose another {what}")


def _relation(target: Path, source: Path) -> str | None:
    """How ``target`` overlaps ``source`` (both resolved): "is", "is inside", "contains" or None."""
    if target == source:
        return "is"
    if source in target.parents:
        return "is inside"
    if target in source.parents:
        return "contains"
    return None


def check_output_target(target: str | os.PathLike, overwrite: bool = False, inputs=(),
                        what: str = "output") -> Path:
    """Refuse, with one line, an output path that would lose data when written with
    ``atomic_directory``: one that is, lies inside or contains one of ``inputs`` (never allowed,
    even with ``overwrite``), or an existing file or non-empty directory unless ``overwrite``.
    An empty directory or a new path is fine. Returns ``target`` as a Path."""
    target = Path(target)
    _check_parents(target, what)
    resolved = target.resolve()
    for source in inputs:
        if source is None or not os.path.lexists(source):
            continue
        relation = _relation(resolved, Path(source).resolve())
        if relation:
            raise LorakitError(f"{what} '{target}' {relation} the input '{source}', which lorakit never "
                               f"writes over (not even with --overwrite); choose another {what}")
    if overwrite or not os.path.lexists(target):
        return target
    if not target.is_dir():
        raise LorakitError(f"{what} '{target}' is an existing file; choose another {what} or pass --overwrite "
                           f"to replace it")
    if any(target.iterdir()):
        raise LorakitError(f"{what} '{target}' is a non-empty directory; choose another {what} or pass "
                           f"--overwrite to replace it (its files will be deleted)")
    return target
