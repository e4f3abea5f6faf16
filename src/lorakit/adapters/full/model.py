"""FullModel: full fine-tuning as an ``AdaptedModel`` (adapters/contract.py).

Nothing is added to the base: the selected parameters of the transformers model itself train
(all of them by default), so the forward is the base model's and ``forward_is_inner_model``
holds. What it publishes is a plain transformers directory (config.json + model.safetensors;
the training loop adds the tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads.
Checkpoints hold the trained tensors in one safetensors file, for an exact resume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit._modules import inner_model_getattr, name_matches, parameter_counts, trainable_parameters_line
from lorakit.adapters.full.config import FullConfig
from lorakit.errors import LorakitError

CHECKPOINT_WEIGHTS = "trainable.safetensors"


class FullModel(nn.Module):
    """The base model with its own weights trainable; see module docstring."""

    forward_is_inner_model = True

    def __init__(self, model: nn.Module, config: FullConfig):
        super().__init__()
        self.model = model
        self.method_config = config
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            model.float()  # fp32 master weights: a half-precision weight loses AdamW's small updates
        selected = _selected_parameters(model, config.trainable_modules)
        if not selected:
            raise LorakitError(f"full.trainable_modules {config.trainable_modules!r} selects no parameter of "
                               f"{type(model).__name__}")
        for name, param in model.named_parameters():
            param.requires_grad_(name in selected and not config.inference_mode)

    __getattr__ = inner_model_getattr  # attributes fall through to the transformers model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # --- the contract --------------------------------------------------------------------
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return parameter_counts(self.model)

    def print_trainable_parameters(self) -> str:
        return trainable_parameters_line(self.model)

    def after_optimizer_step(self, global_step: int) -> None:
        pass

    @contextmanager
    def disable_adapter(self):
        raise LorakitError("full fine-tuning changed the base weights themselves: there is no adapter to disable "
                           "(load the original base model to compare)")
        yield  # pragma: no cover - unreachable; makes this a generator

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """The trained model itself (nothing to merge); frozen."""
        self.model.requires_grad_(False)
        return self.model

    def save_pretrained(self, save_directory: str | Path, **_ignored) -> None:
        """A transformers model directory, each file replaced atomically (a reader never sees a
        half-written model.safetensors)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lorakit-full-", dir=directory))
        try:
            self.model.save_pretrained(staging, safe_serialization=True)
            for path in staging.iterdir():
                os.replace(path, directory / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def save_checkpoint_files(self, directory: Path) -> None:
        tensors = {n: p.detach().contiguous() for n, p in self.trainable_tensors().items()}
        save_file(tensors, str(Path(directory) / CHECKPOINT_WEIGHTS), metadata={"format": "pt"})

    @torch.no_grad()
    def load_checkpoint_files(self, directory: Path) -> None:
        path = Path(directory) / CHECKPOINT_WEIGHTS
        if not path.is_file():
            raise LorakitError(f"checkpoint '{directory}' has no {CHECKPOINT_WEIGHTS}; it was not written by method full")
        saved, live = load_file(str(path)), self.trainable_tensors()
        if set(saved) != set(live):
            missing = sorted(set(live) - set(saved)) or sorted(set(saved) - set(live))
            raise LorakitError(f"{path}: tensor '{missing[0]}' does not match this run's trainable parameters "
                               f"(trainable_modules changed?)")
        for name, tensor in saved.items():
            if tensor.shape != live[name].shape:
                raise LorakitError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the model "
                                   f"{tuple(live[name].shape)}")
            live[name].copy_(tensor)


def _selected_parameters(model: nn.Module, trainable_modules) -> set[str]:
    """Names of the parameters to train: all, or those of modules matching ``trainable_modules``."""
    names = {n for n, _ in model.named_parameters()}
    if trainable_modules is None:
        return names
    return {n for n in names if name_matches(trainable_modules, n.rpartition(".")[0])}


def wrap_full(model: nn.Module, config: FullConfig, adapter_name: str = "default") -> FullModel:
    return FullModel(model, config)


def load_full(model: nn.Module, directory: str | Path, adapter_name: str = "default",
              is_trainable: bool = False) -> FullModel:
    """The fine-tuned model saved in ``directory`` (``model`` is not needed: the directory holds
    every weight); trainable when ``is_trainable``."""
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    except Exception as err:  # transformers raises OSError, ValueError, KeyError ... for a broken directory
        raise LorakitError(f"'{directory}' is not a loadable fine-tuned model directory ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return FullModel(loaded, FullConfig(inference_mode=not is_trainable))
