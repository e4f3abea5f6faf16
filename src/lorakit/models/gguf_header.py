"""Checks of a GGUF file before the ``gguf`` reader and transformers trust what it says.

The reader takes every count in the header at its word: one damaged array length (2**31
entries for a 277-token vocabulary) makes it build Python objects until memory runs out, and a
damaged block_count makes transformers build millions of decoder blocks. ``check_gguf_file``
walks the header first, in the layout of the GGUF spec (v2 / v3: magic, version, tensor count,
key/value count, key/values, tensor infos), and refuses with one line any count or length that
asks for more bytes than the file has left, and a block_count above the blocks it has tensors
for. The walk reads only the header (tens of milliseconds for a 49k-token vocabulary).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from lorakit.errors import LorakitError

# GGUF value types -> size in bytes (8: string, 9: array have their own layout)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Damaged(Exception):
    pass


class _Header:
    """A cursor over the header bytes that refuses to read or skip past the end of the file."""

    def __init__(self, data, order: str):
        self.data, self.order, self.at = data, order, 0

    def need(self, count: int, what: str) -> None:
        left = len(self.data) - self.at
        if count > left:
            raise _Damaged(f"{what} at byte {self.at} needs {count} bytes but {left} follow")

    def integer(self, fmt: str, what: str) -> int:
        self.need(struct.calcsize(fmt), what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.at += count

    def string(self, what: str) -> bytes:
        start = self.at
        self.skip(self.integer("Q", f"{what} length"), what)
        return bytes(self.data[start + 8:self.at])

    def value(self, kind: int, what: str) -> None:
        if kind == _STRING:
            self.string(what)
        elif kind == _ARRAY:
            item, count = self.integer("I", f"{what} item type"), self.integer("Q", f"{what} length")
            smallest = _SCALAR_SIZES.get(item, 12 if item == _ARRAY else 8 if item == _STRING else None)
            if smallest is None:
                raise _Damaged(f"{what} has an unknown item type {item}")
            self.need(count * smallest, f"{what} of {count} items")
            if item in _SCALAR_SIZES:
                self.skip(count * smallest, what)
            else:
                for _ in range(count):
                    self.value(item, what)
        elif kind in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[kind], what)
        else:
            raise _Damaged(f"{what} has an unknown value type {kind}")


def _walk(data) -> tuple[int | None, set[bytes]]:
    """(the block_count the metadata states, the block numbers of the tensors) after checking
    every count and length of the header against the bytes that follow it."""
    if len(data) < 24 or data[:4] != b"GGUF":
        raise _Damaged("it does not start with a GGUF header")
    order = next((o for o in "<>" if struct.unpack_from(o + "I", data, 4)[0] in (2, 3)), None)
    if order is None:
        return None, set()  # a version the reader refuses by itself
    header = _Header(data, order)
    header.at = 8
    n_tensors, n_kv = header.integer("Q", "tensor count"), header.integer("Q", "key/value count")
    header.need(n_kv * 12, f"{n_kv} key/values")  # each: key length (8) + value type (4) at least
    block_count = None
    for number in range(n_kv):
        key = header.string(f"key {number + 1}")
        kind = header.integer("I", f"type of key {number + 1}")
        if key.endswith(b".block_count") and kind in (4, 5, 10, 11):  # (u)int32 / (u)int64
            block_count = header.integer({4: "I", 5: "i", 10: "Q", 11: "q"}[kind], "block_count")
        else:
            header.value(kind, f"value of key {number + 1}")
    header.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, dims count, type, offset
    blocks = set()
    for number in range(n_tensors):
        what = f"tensor info {number + 1}"
        name = header.string(f"{what} name")
        if name.startswith(b"blk."):
            blocks.add(name.split(b".")[1])
        dims = header.integer("I", f"{what} dimension count")
        if dims > _MAX_DIMS:
            raise _Damaged(f"{what} has {dims} dimensions (at most {_MAX_DIMS})")
        header.skip(8 * dims + 12, what)
    return block_count, blocks


def check_gguf_file(gguf_path: str | Path) -> None:
    """One-line LorakitError for a GGUF file whose header is damaged (a count or length past the
    end of the file, an unknown value type, more than 4 dimensions) or whose block_count exceeds
    the blocks it has tensors for. What the walk does not cover is left to the reader."""
    gguf_path = Path(gguf_path)
    with open(gguf_path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise LorakitError(f"{gguf_path}: the file is empty, not a GGUF model")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                block_count, blocks = _walk(data)
            except _Damaged as err:
                raise LorakitError(f"{gguf_path}: not a valid GGUF file: {err}; the file is damaged or "
                                   f"truncated (download it again)") from None
    # transformers builds every promised block before it reads a tensor: a damaged block_count
    # (a million) would take minutes and gigabytes to end in a shape error
    if block_count is not None and block_count > len(blocks):
        raise LorakitError(f"{gguf_path}: its metadata promises {block_count} blocks but it holds tensors of "
                           f"{len(blocks)}; the file is damaged or incomplete (download it again)")
