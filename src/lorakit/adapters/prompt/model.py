"""PromptConfig and PromptModel: the few-shot prompt baseline as an ``AdaptedModel``.

The model is the frozen base, unchanged; the method's effect is context: ``shots`` is a list of
conversations taken from the training data (k of them, chosen with ``seed``), flattened into
user/assistant turns that precede every evaluated or generated conversation, after its system
message (``lorakit.data.build.with_context``). Only the evaluated conversation's own assistant
turns are scored.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit._dataclass_config import peft_config_kwargs, strict_config
from lorakit._io import write_json_atomic
from lorakit._modules import inner_model_getattr
from lorakit.data.formats import detect_format, row_to_example
from lorakit.data.readers import BadRow, read_rows
from lorakit.errors import LorakitError

FILE_NAME = "prompt_baseline.json"


@strict_config
@dataclass
class PromptConfig:
    """num_examples: k training conversations placed in the prompt (0: the plain base model).
    seed: which k (a seeded random choice among the training rows)."""

    num_examples: int = 3
    seed: int = 0
    base_model_name_or_path: str | None = None
    inference_mode: bool = True

    def __post_init__(self):
        if not isinstance(self.num_examples, int) or isinstance(self.num_examples, bool) or self.num_examples < 0:
            raise LorakitError(f"PromptConfig.num_examples must be an integer >= 0, got {self.num_examples!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"num_examples": self.num_examples, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "PromptConfig") -> "PromptConfig":
        return cls(**peft_config_kwargs(cls, data, where))


def few_shot_turns(shots: list[list[dict]]) -> list[dict]:
    """The shots' user and assistant turns in order (their system messages dropped: the evaluated
    conversation's own system message comes first)."""
    return [m for conversation in shots for m in conversation if m["role"] != "system"]


def choose_shots(train_path: str, data_format: str, k: int, seed: int) -> list[list[dict]]:
    """k conversations of the training file, chosen with ``seed`` (bad rows are never chosen)."""
    conversations, fmt = [], None if data_format == "auto" else data_format
    for where, row in read_rows(train_path):
        if isinstance(row, BadRow):
            continue
        try:
            fmt = fmt or detect_format(row, where)
            example = row_to_example(row, fmt)
        except BadRow:
            continue
        if isinstance(example, str):
            raise LorakitError(f"{where}: the prompt baseline needs conversations (instructions, chats), not plain text")
        conversations.append(example)
    if k > len(conversations):
        raise LorakitError(f"prompt.num_examples {k} exceeds the {len(conversations)} usable rows of {train_path}")
    return random.Random(seed).sample(conversations, k)


def prompt_eval_context(config: PromptConfig, data_config) -> list[dict]:
    """The method's ``eval_context`` hook: the few-shot turns every evaluated conversation gets."""
    if data_config.eval is None and data_config.eval_ratio:
        raise LorakitError("the prompt baseline needs a held-out file (data.eval): its few-shot examples come "
                           "from data.train, and eval_ratio would score rows the examples may include")
    return few_shot_turns(choose_shots(data_config.train, data_config.format, config.num_examples, config.seed))


class PromptModel(nn.Module):
    """The frozen base plus the few-shot context (``context``: turns to put before a conversation)."""

    forward_is_inner_model = True

    def __init__(self, model: nn.Module, config: PromptConfig, context: list[dict] | None = None):
        super().__init__()
        self.model = model
        self.method_config = config
        self.context = list(context or [])
        model.requires_grad_(False)

    __getattr__ = inner_model_getattr  # attributes fall through to the transformers model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return 0, sum(p.numel() for p in self.model.parameters())

    def after_optimizer_step(self, global_step: int) -> None:
        pass

    @contextmanager
    def disable_adapter(self):
        yield  # the weights are the base's; only the prompt differs

    def save_pretrained(self, save_directory: str | Path, **_ignored) -> None:
        write_json_atomic(Path(save_directory) / FILE_NAME,
                          {"method": "prompt", **self.method_config.to_dict(), "context": self.context})

    def save_checkpoint_files(self, directory: Path) -> None:
        self.save_pretrained(directory)

    def load_checkpoint_files(self, directory: Path) -> None:
        pass


def wrap_prompt(model: nn.Module, config: PromptConfig, adapter_name: str = "default") -> PromptModel:
    return PromptModel(model, config)


def load_prompt(model: nn.Module, directory: str | Path, adapter_name: str = "default",
                is_trainable: bool = False) -> PromptModel:
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        raise LorakitError(f"'{directory}' holds no prompt baseline ({FILE_NAME} is missing)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        config = PromptConfig(num_examples=saved["num_examples"], seed=saved["seed"])
        context = saved["context"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise LorakitError(f"{path}: not a prompt baseline file ({type(err).__name__}: {err})") from None
    if not isinstance(context, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                and isinstance(m.get("content"), str) for m in context):
        raise LorakitError(f"{path}: 'context' must be a list of {{\"role\", \"content\"}} messages; "
                           f"save the baseline again")
    return PromptModel(model, config, context)
