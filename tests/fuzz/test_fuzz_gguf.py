"""Fuzzed GGUF files loaded as base models (``load_model(path.gguf)``).

A tiny valid GGUF (a 1-layer Llama, hidden size 16, a 277-token SentencePiece vocabulary) is
written with the ``gguf`` package; each case damages it: truncation, random bytes, one integer
of the header (a count, a string length, a dimension, a type, a data offset) replaced by a lie,
or a file written with inconsistent metadata (zero heads, more blocks than tensors, shapes that
do not match, another architecture, no tokenizer).

Property: ``load_model`` loads a working model or raises LorakitError with one line; it never
raises anything else, crashes the process or hangs, and a refusal leaves no entry in the GGUF
cache. Loads run in a worker process (``gguf_worker.py``) so a crash or a hang is observed, not
suffered; the worker's address space is capped so a file claiming huge sizes cannot exhaust
the machine.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_common import counted, fuzz_settings
from tiny_gguf import write_gguf

CASE_SECONDS = 30  # a load of this tiny file takes well under a second; far longer is a hang


# --- the integers of a GGUF header, to lie about ----------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_slots(raw: bytes) -> list[tuple[str, int, int]]:
    """(kind, offset, width) of every count, length, type, dimension and offset in a GGUF v3
    header (the layout: magic, version, tensor count, KV count, KVs, tensor infos, data)."""
    slots = [("version", 4, 4), ("tensor_count", 8, 8), ("kv_count", 16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    at = 24

    def string(kind):
        nonlocal at
        slots.append((kind, at, 8))
        (size,) = struct.unpack_from("<Q", raw, at)
        at += 8 + size

    def value(kind_type):
        nonlocal at
        if kind_type == 8:
            string("string_length")
        elif kind_type == 9:
            slots.append(("array_type", at, 4))
            slots.append(("array_count", at + 4, 8))
            item, count = struct.unpack_from("<IQ", raw, at)
            at += 12
            for _ in range(count):
                value(item)
        else:
            at += _SCALAR_SIZES[kind_type]

    for _ in range(n_kv):
        string("key_length")
        slots.append(("value_type", at, 4))
        (kind_type,) = struct.unpack_from("<I", raw, at)
        at += 4
        value(kind_type)
    for _ in range(n_tensors):
        string("tensor_name_length")
        slots.append(("n_dims", at, 4))
        (n_dims,) = struct.unpack_from("<I", raw, at)
        at += 4
        slots.extend(("dim", at + 8 * i, 8) for i in range(n_dims))
        at += 8 * n_dims
        slots.append(("tensor_type", at, 4))
        slots.append(("data_offset", at + 4, 8))
        at += 12
    return slots


# --- the worker process ------------------------------------------------------------------------

class GgufWorker:
    """Runs ``gguf_worker.py``; ``load(path)`` returns its reply, or {"crash": ...} / {"hang": ...}."""

    def __init__(self, cache: Path, log: Path):
        self.cache, self.log, self.process = cache, log, None

    def _start(self):
        env = dict(os.environ, LORAKIT_CACHE=str(self.cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gguf_worker.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "ab"),
                                        env=env, text=True)
        ready = self._reply(120)
        assert ready.get("ready"), f"the GGUF worker did not start: {ready} {self._log_tail()}"

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""

    def _reply(self, seconds: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], seconds)
        if not ready:
            self.stop()
            return {"hang": f"no answer within {seconds} s"}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.process = None
            return {"crash": f"the worker died (exit status {code}): {self._log_tail()}"}
        return json.loads(line)

    def load(self, path: Path) -> dict:
        if self.process is None:
            self._start()
        self.process.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.process.stdin.flush()
        return self._reply(CASE_SECONDS)

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-worker")
    process = GgufWorker(root / "cache", root / "worker.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


LIES = [0, 1, 2, 3, 7, 8, 12, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1]


@st.composite
def damaged_gguf(draw, raw: bytes) -> tuple[str, bytes]:
    """(what was done, file bytes)."""
    kind = draw(st.sampled_from(["truncate", "bytes", "lie", "lie", "lie", "write", "write"]))
    if kind == "truncate":
        at = draw(st.one_of(st.integers(0, 200), st.integers(0, len(raw) - 1)))
        return f"truncated at {at}", raw[:at]
    if kind == "bytes":
        data = bytearray(raw)
        end = draw(st.sampled_from([4096, len(data)]))  # mostly the header (metadata, tensor infos)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, min(end, len(data)) - 1))] = draw(st.integers(0, 255))
        return "random bytes", bytes(data)
    if kind == "lie":
        slots = header_slots(raw)
        kinds = sorted({slot[0] for slot in slots})
        chosen = draw(st.sampled_from(kinds))
        _, offset, width = draw(st.sampled_from([s for s in slots if s[0] == chosen]))
        (original,) = struct.unpack_from("<I" if width == 4 else "<Q", raw, offset)
        value = draw(st.sampled_from(LIES + [original + 1, max(original - 1, 0), original * 2, len(raw)]))
        value %= 2 ** (8 * width)
        data = bytearray(raw)
        struct.pack_into("<I" if width == 4 else "<Q", data, offset, value)
        return f"{chosen} at {offset}: {original} -> {value}", bytes(data)
    options = draw(st.fixed_dictionaries({}, optional={
        "arch": st.sampled_from(["qwen2", "gpt2", "bogus", "llama"]),
        "hidden": st.sampled_from([0, 8, 15, 16, 32]),
        "layers": st.integers(0, 2),
        "heads": st.sampled_from([0, 1, 2, 3, 16]),
        "kv_heads": st.sampled_from([0, 1, 2, 3]),
        "ff": st.sampled_from([0, 1, 32]),
        "vocab_extra": st.sampled_from([-300, -1, 1, 1000]),
        "drop": st.sets(st.sampled_from(["token_embd.weight", "output.weight", "blk.0.attn_q.weight",
                                         "output_norm.weight", "blk.0.ffn_down.weight"]), max_size=2).map(frozenset),
        "tokenizer": st.booleans(),
        "block_count": st.sampled_from([0, 2, 5, 2**20]),
        "dtype": st.sampled_from([np.float16, np.float32]),
        "shape_lie": st.sampled_from(["token_embd.weight", "blk.0.attn_k.weight", "output_norm.weight"]),
    }))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            data = write_gguf(Path(tmp) / "x.gguf", **options).read_bytes()
        except (ValueError, ZeroDivisionError, OverflowError, struct.error) as err:  # the writer refuses it
            return f"writer refused {options}: {err}", raw
    return f"written with {options}", data


def check_gguf(worker: GgufWorker, what: str, data: bytes) -> None:
    with counted("gguf"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        path.write_bytes(data)
        result = worker.load(path)
        assert "hang" not in result and "crash" not in result, f"{what}: {result}"
        assert "other" not in result, f"{what}: load_model raised something else than LorakitError:\n{result['other']}"
        if "lorakit" in result:
            message = result["lorakit"]
            assert message.strip() and len(message.splitlines()) == 1, f"{what}: message of several lines {message!r}"
            assert not result["cache"], f"{what}: refused ({message}) but left {result['cache']} in the cache"
        else:
            assert len(result["cache"]) == 1, f"{what}: loaded, cache holds {result['cache']}"


# --- fast tier ------------------------------------------------------------------------------

@fuzz_settings(40)
@given(data=st.data())
def test_gguf_fast(worker, valid_gguf, data):
    check_gguf(worker, *data.draw(damaged_gguf(valid_gguf)))


def test_the_valid_gguf_loads(worker, valid_gguf, tmp_path):
    """The fuzzer's starting point loads, so damage is what makes a case fail."""
    path = tmp_path / "valid.gguf"
    path.write_bytes(valid_gguf)
    assert worker.load(path).get("ok"), worker.load(path)


# --- long tier ------------------------------------------------------------------------------

@pytest.mark.long
@fuzz_settings(1500)
@given(data=st.data())
def test_gguf_long(worker, valid_gguf, data):
    check_gguf(worker, *data.draw(damaged_gguf(valid_gguf)))
