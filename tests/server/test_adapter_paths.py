"""POST /v1/load_lora_adapter under attack: path tricks and broken adapter files, over real HTTP.

A decoy adapter (valid, for this very base model) lies next to the adapter root; every trick
aims at it. Each is refused with a 4xx naming the field, the decoy is never served, and an
audit hook sees no file or directory outside the root opened or listed by the server while the
tricks run. Broken adapters inside the root are a 400 each, leave no half-loaded adapter behind
and do not change what the loaded adapters generate.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from server_setup import API_KEY, REPORT, TINY_FIXED

AUTH = {"Authorization": f"Bearer {API_KEY}"}
_RECORDING: list[str] | None = None  # paths the process opens or lists while set


def _audit(event: str, args: tuple) -> None:
    if _RECORDING is not None and event in ("open", "os.listdir", "os.scandir") and args \
            and isinstance(args[0], (str, bytes, os.PathLike)):
        _RECORDING.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only records while a test asks it to

pytestmark = pytest.mark.usefixtures("no_server_errors")


def _load(url: str, name, path) -> httpx.Response:
    body = json.dumps({"lora_name": name, "lora_path": path})  # ASCII-escaped: lone surrogates travel too
    return httpx.post(url + "/v1/load_lora_adapter", headers=AUTH, content=body, timeout=60)


def _unload(url: str, name: str) -> None:
    assert httpx.post(url + "/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": name}).status_code == 200


def _served(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]]


def _greedy(url: str, model: str) -> str:
    reply = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": model, "prompt": "The sky is", "max_tokens": 6, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


@pytest.fixture
def tricks(tiny_server):
    """Links, files and odd directories planted in the adapter root for one test, removed after."""
    root, decoy = tiny_server.root, tiny_server.dirs["decoy"]
    planted = {
        "escape": lambda p: p.symlink_to(decoy, target_is_directory=True),
        "alias": lambda p: p.symlink_to(root / "r1", target_is_directory=True),  # stays inside: allowed
        "loop": lambda p: p.symlink_to(p),
        "notadir": lambda p: p.write_text("just a file"),
        "fifo": lambda p: os.mkfifo(p),
        "mixed": lambda p: (p.mkdir(), shutil.copy(decoy / "adapter_config.json", p),
                            (p / "adapter_model.safetensors").symlink_to(decoy / "adapter_model.safetensors")),
        "cfglink": lambda p: (p.mkdir(), shutil.copy(decoy / "adapter_model.safetensors", p),
                              (p / "adapter_config.json").symlink_to(decoy / "adapter_config.json")),
    }
    for name, make in planted.items():
        make(root / name)
    yield root, decoy
    for name in planted:
        path = root / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def test_path_tricks_are_refused_and_nothing_outside_the_root_is_read(tiny_server, tricks):
    global _RECORDING
    url = tiny_server.url
    root, decoy = tricks
    before = _served(url)
    bad_paths = ["../decoy", "r0/../../decoy", str(decoy), str(decoy) + "/", f"{root}/../decoy", "escape", "escape/",
                 "mixed", "cfglink", "%2e%2e/decoy", "%2e%2e%2fdecoy", "..%2fdecoy", "r0\x00/../../decoy",
                 "r0\x00", "a" * 5_000, "r0/" + "x" * 300, "x/" * 2_100, "notadir", "fifo", "loop", "loop/x",
                 "\ud800", "r0/\udcff", ".", "", "./", str(root), "/", "/etc", "/proc/self/cwd", "~/decoy",
                 "..\\decoy", "r0/adapter_config.json", "r0/adapter_model.safetensors", 123, None, ["r0"], {"p": 1}]
    _RECORDING = []
    try:
        replies = [(path, _load(url, f"trick{i}", path)) for i, path in enumerate(bad_paths)]
    finally:
        seen, _RECORDING = _RECORDING, None
    for path, reply in replies:
        assert reply.status_code == 400, (str(path)[:60], reply.status_code, reply.text[:300])
        error = reply.json()["error"]
        assert error["param"] == "lora_path" and "\n" not in error["message"] and len(error["message"]) < 400, error
    assert _served(url) == before and "decoy" not in str(_served(url))
    outside = [p for p in seen if Path(p).is_absolute() and Path(p).resolve().is_relative_to(decoy.parent)
               and not Path(p).resolve().is_relative_to(root)]
    assert not outside, outside[:5]

    # the same mechanisms inside the root are fine: a link to another adapter there, an absolute path there
    for name, path in [("via-link", "alias"), ("absolute", str(root / "r2"))]:
        assert _load(url, name, path).status_code == 200
        assert name in _served(url) and _greedy(url, name)
        _unload(url, name)
    REPORT.append(f"adapter paths: {len(bad_paths)} tricks refused with 400, 0 files outside the root opened "
                  f"({len(seen)} opens/listings audited)")


class _RunsCode:
    """A pickle that would create a file if unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _broken_adapters(root: Path, good: Path, other: Path, marker: Path) -> dict[str, str]:
    """Adapter directories under ``root`` that must each fail to load (their names say why)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((good / "adapter_config.json").read_text())
    weights = load_file(str(good / "adapter_model.safetensors"))

    def make(name: str, config_text: str | None, weights_bytes: bytes | None = None, tensors=None):
        directory = root / name
        directory.mkdir(parents=True)
        if config_text is not None:
            (directory / "adapter_config.json").write_text(config_text)
        if weights_bytes is not None:
            (directory / "adapter_model.safetensors").write_bytes(weights_bytes)
        if tensors is not None:
            save_file(tensors, str(directory / "adapter_model.safetensors"))
        return directory

    good_config, good_bytes = json.dumps(config), (good / "adapter_model.safetensors").read_bytes()
    make("bad-json", "{not json", good_bytes)
    make("empty-config", "", good_bytes)
    make("config-list", "[1, 2]", good_bytes)
    make("no-peft-type", "{}", good_bytes)
    make("unknown-type", json.dumps({**config, "peft_type": "NOPE"}), good_bytes)
    make("rank-text", json.dumps({**config, "r": "x"}), good_bytes)
    make("rank-zero", json.dumps({**config, "r": 0}), good_bytes)
    make("unknown-key", json.dumps({**config, "bogus_key": 1}), good_bytes)
    make("no-targets", json.dumps({**config, "target_modules": ["no_such_module"]}), good_bytes)
    # recorded for another base by name only (no fingerprint: a fingerprint of this base would match)
    make("other-base", json.dumps({**config, "base_model_name_or_path": "gpt2"}), tensors=weights)
    make("no-weights", good_config)
    make("random-weights", good_config, os.urandom(4096))
    make("truncated-weights", good_config, good_bytes[: len(good_bytes) // 2])
    make("huge-header", good_config, (10**12).to_bytes(8, "little") + b"{}")
    make("other-rank", good_config, (other / "adapter_model.safetensors").read_bytes())
    make("missing-tensor", good_config, tensors=dict(list(weights.items())[1:]))
    make("extra-tensor", good_config, tensors={**weights, "base_model.model.extra.lora_A.weight": torch.ones(2, 2)})
    make("nan-weights", good_config, tensors={k: torch.full_like(v, float("nan")) for k, v in weights.items()})
    pickled = make("pickle-bin", good_config)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCode(marker)}))
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_broken_adapters_are_400_and_leave_the_served_ones_unchanged(tiny_server, tmp_path):
    url, engine = tiny_server.url, tiny_server.engine
    root = tiny_server.root / "broken"
    marker = tmp_path / "pickle-ran"
    try:
        names = _broken_adapters(root, tiny_server.dirs["r0"], tiny_server.dirs["r1"], marker)
        before = {model: _greedy(url, model) for model in ["tiny", TINY_FIXED[0]]}
        served = _served(url)
        for name in names:
            reply = _load(url, name, f"broken/{name}")
            assert reply.status_code == 400, (name, reply.status_code, reply.text[:300])
            error = reply.json()["error"]
            assert error["param"] == "lora_path" and "\n" not in error["message"], (name, error)
            assert _served(url) == served and name not in engine.multi.adapter_names
        assert not marker.exists()  # the legacy .bin is loaded with weights_only
        assert {model: _greedy(url, model) for model in before} == before
        reply = _load(url, "after-all-that", "r3")  # loading still works afterwards
        assert reply.status_code == 200 and _greedy(url, "after-all-that")
        _unload(url, "after-all-that")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    REPORT.append(f"broken adapters: {len(names)} refused with 400, served adapters unchanged")
