"""``DataConfig``: where the data is, which format it has, and how it becomes token sequences."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit._dataclass_config import is_number, strict_config
from lorakit.errors import LorakitError, closest_hint

FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text", "preference", "kto")
PREFERENCE_FORMATS = ("preference", "kto")  # rows of answers compared, not one conversation to imitate


@strict_config
@dataclass
class DataConfig:
    """Data settings (the ``data.*`` keys of a training config).

    train / eval: a .jsonl, .json, .csv or .parquet file, or a directory written by
    ``datasets.Dataset.save_to_disk``. ``eval_ratio`` instead holds out that fraction of the
    training rows (shuffled with ``seed``). ``format: auto`` detects the format from the first
    row's keys. ``max_seq_len`` truncates every sample (the count is reported). ``packing``
    concatenates several samples per row (see ``make_batches``): true, false, or ``auto`` (the
    default) = on where the model packs exactly (``resolve_packing`` runs ``verify_packing`` on
    it), off elsewhere. ``group_by_length`` (default on) batches training samples of similar
    length together, within pools of the seeded shuffle as transformers' Trainer does, and packs
    each pool first-fit decreasing: on real data with variable lengths, padding to the longest
    sample of a batch is the main waste of unpacked training; off gives the batch order of
    lorakit before it existed (every sample is still seen once per epoch either way).
    ``train_on_prompt`` labels every token instead of only the assistant / response tokens.
    ``skip_bad_rows`` skips and counts malformed rows instead of stopping at the first one.
    """

    train: str | None = None
    eval: str | None = None
    format: str = "auto"
    max_seq_len: int = 1024
    packing: bool | str = "auto"
    group_by_length: bool = True
    train_on_prompt: bool = False
    eval_ratio: float = 0.0
    skip_bad_rows: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LorakitError(f"data.format {self.format!r} is unknown{closest_hint(str(self.format), FORMATS)}; "
                               f"valid choices: {', '.join(FORMATS)}")
        for name in ("train", "eval"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise LorakitError(f"data.{name} must be a file or directory path, got {getattr(self, name)!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise LorakitError(f"data.max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if not (isinstance(self.packing, bool) or self.packing == "auto"):
            raise LorakitError(f"data.packing must be true, false or auto, got {self.packing!r}")
        if not isinstance(self.group_by_length, bool):
            raise LorakitError(f"data.group_by_length must be true or false, got {self.group_by_length!r}")
        if not (is_number(self.eval_ratio) and 0.0 <= self.eval_ratio < 1.0):
            raise LorakitError(f"data.eval_ratio must be in [0, 1), got {self.eval_ratio!r}")
        if self.eval and self.eval_ratio:
            raise LorakitError("set either data.eval (a file) or data.eval_ratio (a split of data.train), not both")
