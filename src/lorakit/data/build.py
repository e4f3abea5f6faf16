"""Data files -> tokenized samples: ``build_datasets`` and its ``DataStats``.

A sample is {"input_ids": list[int], "labels": list[int]} of equal length <= max_seq_len,
labels IGNORE_INDEX (-100) on tokens not trained on. Samples keep the first max_seq_len
tokens; one with no trainable label left after truncation is dropped and counted.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

from lorakit.data.config import PREFERENCE_FORMATS, DataConfig
from lorakit.data.formats import detect_format, row_to_example
from lorakit.data.preference import add_kl_pairs, preference_sample, sample_token_counts
from lorakit.data.readers import BadRow, read_rows
from lorakit.data.templates import IGNORE_INDEX, tokenize_conversation, tokenize_text
from lorakit.errors import LorakitError


@dataclass
class DataStats:
    """Counts from ``build_datasets``; ``str()`` is a one-line summary."""

    format: str = ""
    train_samples: int = 0
    eval_samples: int = 0
    truncated: int = 0       # samples cut to max_seq_len (train + eval)
    skipped: int = 0         # bad rows skipped (skip_bad_rows: true)
    dropped: int = 0         # samples with no trainable label left after truncation
    train_tokens: int = 0
    train_label_tokens: int = 0
    max_seq_len: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.train_label_tokens / max(self.train_tokens, 1)
        return (f"data: format {self.format}, {self.train_samples} train / {self.eval_samples} eval samples, "
                f"{self.train_tokens} train tokens ({share:.0f}% labelled), {self.truncated} truncated to "
                f"max_seq_len {self.max_seq_len}, {self.skipped} bad rows skipped, {self.dropped} dropped "
                f"without labels")


def _has_labels(labels: list[int]) -> bool:
    # position 0 is never a target: a causal LM predicts token t from tokens < t
    return any(label != IGNORE_INDEX for label in labels[1:])


def _bad(where: str, reason: str) -> LorakitError:
    return LorakitError(f"{where}: {reason}; fix the row or set data.skip_bad_rows: true")


def with_context(messages: list[dict], context: list[dict]) -> tuple[list[dict], int]:
    """(conversation with ``context`` turns placed after its system message, index of its own
    first turn): how few-shot examples precede a conversation (the prompt baseline)."""
    if not context:
        return messages, 0
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    combined = head + list(context) + messages[len(head):]
    return combined, len(head) + len(context)


def _tokenize_with_context(tokenizer, messages: list[dict], context: list[dict], config: DataConfig):
    """(input_ids, labels) of ``messages`` after as much of ``context`` as max_seq_len leaves room
    for: whole user/assistant pairs are dropped from the front, so the scored turns are never cut."""
    while True:
        combined, label_from = with_context(messages, context)
        ids, labels = tokenize_conversation(tokenizer, combined, config.train_on_prompt, label_from)
        if len(ids) <= config.max_seq_len or not context:
            return ids, labels
        context = context[2:]


def _load_file(path: str, config: DataConfig, tokenizer, stats: DataStats,
               context: list[dict] | None = None) -> tuple[list[dict], str]:
    """Samples of one file and the format used; updates the truncated/skipped/dropped counts.
    ``context``: turns placed before each conversation, unlabelled (see ``with_context``)."""
    fmt = None if config.format == "auto" else config.format
    samples, rows, skipped, truncated, dropped, first_bad = [], 0, 0, 0, 0, None
    for where, row in read_rows(path):
        rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            fmt = fmt or detect_format(row, where)
            if fmt in PREFERENCE_FORMATS:
                if context:
                    raise LorakitError(f"{where}: few-shot context needs conversations, not preference rows")
                sample, cut = preference_sample(tokenizer, row, fmt, config.max_seq_len)
                truncated += bool(cut)
                dropped += sample is None
                samples += [sample] if sample is not None else []
                continue
            example = row_to_example(row, fmt)
            if isinstance(example, str):
                if context:
                    raise LorakitError(f"{where}: few-shot context needs conversations, not plain text")
                ids, labels = tokenize_text(tokenizer, example)
            else:
                ids, labels = _tokenize_with_context(tokenizer, example, context or [], config)
        except BadRow as err:
            if not config.skip_bad_rows:
                raise _bad(where, str(err)) from None
            skipped += 1
            first_bad = first_bad or f"{where}: {err}"
            continue
        if len(ids) > config.max_seq_len:
            ids, labels = ids[: config.max_seq_len], labels[: config.max_seq_len]
            truncated += 1
        if not _has_labels(labels):
            dropped += 1
            continue
        samples.append({"input_ids": ids, "labels": labels})
    if fmt == "kto" and samples:
        add_kl_pairs(samples, config.max_seq_len)
    stats.skipped, stats.truncated, stats.dropped = (stats.skipped + skipped, stats.truncated + truncated,
                                                     stats.dropped + dropped)
    if skipped:
        warnings.warn(f"lorakit: skipped {skipped} bad rows of {rows} in {path} (first: {first_bad})", stacklevel=3)
    if rows == 0:
        raise LorakitError(f"{path}: the dataset is empty (no rows); point data.train / data.eval at a file with data")
    if rows == skipped:
        raise LorakitError(f"{path}: all {rows} rows are bad (first: {first_bad}); fix the data")
    if not samples:
        raise LorakitError(f"{path}: every label is masked in all {rows - skipped} samples ({truncated} "
                           f"truncated to max_seq_len {config.max_seq_len}); raise data.max_seq_len or shorten "
                           f"the prompts")
    if dropped:
        warnings.warn(f"lorakit: dropped {dropped} samples of {path} with no trainable label left after "
                      f"truncation to max_seq_len {config.max_seq_len}", stacklevel=3)
    return samples, fmt


def _split(samples: list[dict], ratio: float, seed: int, path: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) with round(ratio * n) (at least 1) samples held out, chosen with ``seed``."""
    n_eval = max(1, round(ratio * len(samples)))
    if n_eval >= len(samples):
        raise LorakitError(f"{path}: eval_ratio {ratio} leaves no training samples out of {len(samples)}; "
                           f"lower data.eval_ratio or add data")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in held],
            [samples[i] for i in sorted(held)])


def build_datasets(config: DataConfig, tokenizer,
                   eval_context: list[dict] | None = None) -> tuple[list[dict], list[dict] | None, DataStats]:
    """(train samples, eval samples or None, stats) for ``config``. ``eval_context``: turns placed
    before every evaluated conversation, unlabelled (the prompt baseline's few-shot examples).

    Each sample: {"input_ids": list[int], "labels": list[int]}, len <= config.max_seq_len,
    labels -100 on tokens not trained on (prompt tokens unless train_on_prompt).
    Raises LorakitError for bad rows (file and line) unless skip_bad_rows, an empty dataset,
    or a dataset whose labels are all masked.
    """
    if not config.train:
        raise LorakitError("data.train is not set; give the path of a .jsonl/.json/.csv/.parquet file or a "
                           "saved dataset directory")
    stats = DataStats(max_seq_len=config.max_seq_len)
    train, stats.format = _load_file(config.train, config, tokenizer, stats)
    if config.train_on_prompt and stats.format in PREFERENCE_FORMATS:
        raise LorakitError(f"data.train_on_prompt does not apply to {stats.format} rows (only the answers are "
                           f"compared); set it to false")
    evaluation = None
    if config.eval:
        evaluation, eval_format = _load_file(config.eval, config, tokenizer, stats, eval_context)
        _check_same_kind(stats.format, eval_format, config)
    elif config.eval_ratio:
        train, evaluation = _split(train, config.eval_ratio, config.seed, config.train)
    stats.train_samples = len(train)
    stats.eval_samples = len(evaluation) if evaluation else 0
    counts = [sample_token_counts(s) for s in train]
    stats.train_tokens = sum(tokens for tokens, _ in counts)
    stats.train_label_tokens = sum(labelled for _, labelled in counts)
    return train, evaluation, stats


def _kind(fmt: str) -> str:
    return fmt if fmt in PREFERENCE_FORMATS else "sft"


def _check_same_kind(train_format: str, eval_format: str, config: DataConfig) -> None:
    """Train and eval rows must feed the same objective (conversations, pairs, or KTO rows)."""
    if _kind(train_format) != _kind(eval_format):
        raise LorakitError(f"{config.eval}: {eval_format} rows, but {config.train} has {train_format} rows; "
                           f"evaluate on rows of the same kind")
