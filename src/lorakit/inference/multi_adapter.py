"""One frozen base model with many named LoRA adapters: load, switch, disable, delete, and run
batches in which every row uses its own adapter.

    mam = MultiAdapterModel.from_pretrained("smollm2-135m-instruct", {"sql": "out/sql", "chat": "out/chat"})
    mam.set_adapter("sql")                       # every row uses "sql"
    with mam.disable_adapter(): ...              # exactly the base model
    logits = mam(input_ids, adapter_names=["sql", "chat", None]).logits   # per-row adapters

Adapters are checked when loaded: a recorded base model that is not the served one (by its base
fingerprint, else by name; ``check_base=False`` skips this), a target module the model lacks, or
a tensor of the wrong shape is a one-line error naming the culprit.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.inference.mixed import AdapterStacks, mixed_adapters

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")  # fullmatch: '$' would let "a\n" through


def normalized_model_name(name: str | None) -> str | None:
    """A comparable name for a base model: the hub id for a built-in alias, the last path
    segment, lower case, without a .gguf suffix, quantisation tag or lorakit cache hash.
    "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct" and the cached GGUF
    directory "SmolLM2-135M-Instruct.Q4_1-ec42178af428" all give "smollm2-135m-instruct"."""
    if not name:
        return None
    from lorakit.models.load import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        name = BUILTIN_MODELS[name][2]
    stem = str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    stem = re.sub(r"-[0-9a-f]{12}$", "", stem)
    stem = re.sub(r"\.gguf$", "", stem)
    return re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", stem)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise LorakitError(f"adapter name {name!r} is not valid; use 1-128 letters, digits and . _ - : / "
                           f"starting with a letter or digit")


class MultiAdapterModel:
    """A transformers causal LM (``self.model``) carrying any number of named LoRA adapters."""

    def __init__(self, model, tokenizer=None, base_name: str | None = None, check_base: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.base_name = base_name or getattr(model, "name_or_path", None)
        self.check_base = check_base
        self.lora = None  # LoraModel once the first adapter is loaded
        self.active: str | None = None
        self._stacks: AdapterStacks | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, adapters: dict[str, str | Path] | None = None,
                        dtype="float32", device="cpu", check_base: bool = True) -> "MultiAdapterModel":
        """Load the base model (and tokenizer) and every adapter of ``adapters`` (name -> directory)."""
        from lorakit.models.load import load_model

        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        multi = cls(model, tokenizer, base_name=name_or_path, check_base=check_base)
        for name, directory in (adapters or {}).items():
            multi.add_adapter(name, directory)
        return multi

    # --- adapters ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora.peft_config) if self.lora is not None else []

    def add_adapter(self, name: str, directory: str | Path) -> None:
        """Load the adapter saved in ``directory`` (peft or lorakit layout) as ``name``.
        The active adapter does not change."""
        from lorakit.models import peft_format
        from lorakit.models.lora_model import LoraModel

        check_adapter_name(name)
        if name in self.adapter_names:
            raise LorakitError(f"adapter '{name}' is already loaded; unload it first or choose another name")
        config = peft_format.read_adapter_config_dict(directory)
        if self.check_base:
            self._check_base(name, directory, config.get("base_model_name_or_path"))
        if self.lora is None:
            self.lora = LoraModel.from_pretrained(self.model, directory, name)
        else:
            self.lora.load_adapter(directory, name)
        self._stacks = None
        self._restore_active()

    def _check_base(self, name: str, directory, recorded: str | None) -> None:
        """Refuse an adapter made for another base: by its base fingerprint when the file has
        one (then the names may differ: a local copy of the same weights is the same base),
        else by the base_model_name_or_path it records."""
        from lorakit.models.fingerprint import adapter_base, require_same_base

        if adapter_base(directory) is not None:
            require_same_base(directory, self.model, hint="load it over its own base (lorakit serve --force "
                                                          "loads it anyway)")
        elif recorded and self.base_name and normalized_model_name(recorded) != normalized_model_name(self.base_name):
            raise LorakitError(f"adapter '{name}' ({directory}) was trained on base model '{recorded}', not "
                               f"'{self.base_name}'; load it over its own base (lorakit serve --force loads it "
                               f"anyway if they are the same weights)")

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapter_names:
            raise LorakitError(f"unknown adapter '{name}'; loaded: {', '.join(self.adapter_names) or 'none'}")
        self.lora.delete_adapter(name)
        self._stacks = None
        if self.active == name:
            self.active = None
        self._restore_active()

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter every row uses (None: the base model)."""
        if name is not None and name not in self.adapter_names:
            raise LorakitError(f"unknown adapter '{name}'; loaded: {', '.join(self.adapter_names) or 'none'}")
        self.active = name
        self._restore_active()

    def _restore_active(self) -> None:
        if self.lora is None:
            return
        if self.active is not None:
            self.lora.set_adapter(self.active)
        else:
            for _, layer in self.lora.adapter_layers():
                layer.active_adapters = []
            for wrapper in self.lora._wrappers():
                wrapper.active_adapter = None

    @contextmanager
    def disable_adapter(self):
        """Context in which the model computes exactly the base model's outputs."""
        if self.lora is None:
            yield
            return
        with self.lora.disable_adapter():
            yield

    # --- mixed batches ----------------------------------------------------------------
    def stacks(self) -> AdapterStacks:
        """The stacked adapters for mixed batches, rebuilt after every load or unload."""
        if self._stacks is None:
            self._stacks = AdapterStacks(self.lora, self.adapter_names) if self.lora is not None else None
        return self._stacks

    @contextmanager
    def mixed(self, row_adapters: Sequence[str | None]):
        """Context in which row b of every forward uses adapter ``row_adapters[b]`` (None: base)."""
        wanted = [a for a in row_adapters if a not in (None, "")]
        if not wanted:
            with self.disable_adapter():
                yield None
            return
        stacks = self.stacks()
        if stacks is None:
            raise LorakitError(f"row adapter '{wanted[0]}' is not loaded; no adapters are loaded")
        with mixed_adapters(stacks, row_adapters) as rows:
            yield rows

    def __call__(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """Forward pass; with ``adapter_names`` row b uses adapter ``adapter_names[b]``."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs) -> torch.Tensor:
        """transformers ``generate`` (KV cache) with per-row adapters when ``adapter_names`` is given."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed(adapter_names):
            return self.model.generate(*args, **kwargs)
