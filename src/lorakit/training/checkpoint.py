"""Checkpoints: everything needed to continue a run as if it had never stopped.

    <output_dir>/checkpoints/step-000050/
        adapter_config.json, adapter_model.safetensors   the method's trainable state (LoRA: the adapter, peft layout)
        optimizer.pt, scheduler.pt                        AdamW moments, schedule position
        rng_state.pt                                      python / numpy / torch (/cuda) RNG, per process
        trainer_state.json                                global step, data position, config

A checkpoint directory is written under a temporary name and renamed into place
(``lorakit._io.atomic_directory``), so ``latest_checkpoint`` never returns a half-written one.
Data position is the global step: batches are a pure function of (seed, epoch), so the
resumed run rebuilds them and skips the steps already done.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lorakit._io import atomic_directory
from lorakit.errors import LorakitError

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return max(found)[1] if found else None


def remove_partial_writes(output_dir: str | Path) -> list[Path]:
    """Delete what a killed run left half-written: temporary checkpoint directories and temporary
    files (``.<name>.*.tmp``, never renamed into place, so never read). Returns what was removed."""
    out = Path(output_dir)
    found = list(out.glob(".*.tmp")) + list((out / CHECKPOINTS).glob(".*.tmp")) + \
        list((out / CHECKPOINTS).glob(".step-*.old.*"))
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


# --- RNG -----------------------------------------------------------------------------------

def capture_rng() -> dict:
    """Every RNG a training step can draw from (dropout uses torch's)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- save / load ---------------------------------------------------------------------------

def save_checkpoint(directory: Path, model, optimizer, scheduler, rng_states: list[dict], state: dict) -> Path:
    """Write one checkpoint atomically (call on the main process only)."""
    with atomic_directory(directory) as tmp:
        model.save_checkpoint_files(tmp)  # the method's trainable state, exact (PiSSA: raw factors)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_state.pt")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return directory


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LorakitError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete") from None


def read_state(directory: Path) -> dict:
    """The trainer state (step, data position, config) saved in a checkpoint directory."""
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        raise LorakitError(f"'{directory}' is not a lorakit checkpoint ({STATE_NAME} is missing)")
    return json.loads(path.read_text())


def load_checkpoint(directory: Path, model, optimizer, scheduler, process_index: int = 0,
                    state: dict | None = None) -> dict:
    """Restore adapter weights, optimizer, scheduler and this process's RNG; return trainer state
    (``state``, when the caller has read it already with ``read_state``)."""
    directory = Path(directory)
    state = state if state is not None else read_state(directory)
    model.load_checkpoint_files(directory)
    optimizer.load_state_dict(_load(directory / "optimizer.pt"))
    scheduler.load_state_dict(_load(directory / "scheduler.pt"))
    rng_states = _load(directory / "rng_state.pt")
    if process_index >= len(rng_states):
        raise LorakitError(f"{directory} was saved by {len(rng_states)} process(es); resume with the same number")
    restore_rng(rng_states[process_index])
    return state
