"""Preference rows -> token samples -> batches, for the dpo / ipo / orpo / simpo / kto objectives.

Rows (TRL's dataset formats, "explicit prompt"):

    preference  {"prompt", "chosen", "rejected", "system"?}
    kto         {"prompt", "completion", "label": true | false}

``prompt`` is a string (one user turn, after an optional ``system``) or a list of chat messages
{"role", "content"}; ``chosen`` / ``rejected`` / ``completion`` are a string (one assistant turn)
or a list of messages holding at least one assistant turn. Each answer is rendered after the
prompt with the chat template exactly as an SFT conversation is (``tokenize_conversation``), so
the prompt is shared and masked (labels -100) and only the answer's assistant tokens carry labels.

Samples:

    pair  {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}   (+ "ref_logps": (c, r))
    kto   {"input_ids", "labels", "desirable": bool, "kl_input_ids", "kl_labels"}
                                                               (+ "ref_logps": float, "ref_kl_logps": float)

KTO's KL term (Ethayarajh et al. 2024) is estimated on mismatched pairs (x_i, y_j): sample i
gets the prompt of row i followed by the completion of row i-1 (row n-1 for row 0), fixed when
the file is read, so the pairing (and a precomputed reference for it) does not depend on the
shuffle. A batch of samples in file order then holds exactly TRL's mismatched pairs (TRL rotates
the completions by one within each batch).

Batches (no packing: each sequence's log-probability is summed on its own row):

    pairs  input_ids / labels / attention_mask (2B, T): rows [chosen_1..chosen_B, rejected_1..rejected_B]
           (+ ref_logps (2B,) when precomputed), use_cache=False
    kto    input_ids / labels / attention_mask (B, T), desirable (B,) bool, kl_input_ids /
           kl_labels / kl_attention_mask (B, T') (+ ref_logps (B,), ref_kl_logps (B,))
"""

from __future__ import annotations

import torch

from lorakit.data.batching import collate, plan_batches
from lorakit.data.formats import ROLES, _check_encodable, _messages, _text_field
from lorakit.data.readers import BadRow
from lorakit.data.templates import IGNORE_INDEX, tokenize_conversation
from lorakit.errors import LorakitError

_ROLE_MAP = {r: r for r in ROLES}


def _turns(row: dict, key: str, answer: bool) -> list[dict]:
    """The messages of field ``key``: a string is one user turn (prompt) or one assistant turn
    (answer); a list is validated as chat messages, an answer needing an assistant turn."""
    value = row.get(key)
    if isinstance(value, list):
        return _messages(row, key, "role", "content", _ROLE_MAP, need_assistant=answer)
    text = _text_field(row, key)
    _check_encodable(text, f"field '{key}'")
    return [{"role": "assistant" if answer else "user", "content": text}]


def _prompt(row: dict) -> list[dict]:
    prompt = _turns(row, "prompt", answer=False)
    system = row.get("system")
    if system is not None and isinstance(row.get("prompt"), str):
        system = _text_field(row, "system", required=False)
        prompt = ([{"role": "system", "content": system}] if system else []) + prompt
    return prompt


def _desirable(row: dict) -> bool:
    label = row.get("label")
    if isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are strings
        return label.strip().lower() == "true"
    raise BadRow(f"field 'label' must be true (desirable) or false (undesirable), got {label!r}")


def _answer_tokens(tokenizer, prompt: list[dict], answer: list[dict], max_seq_len: int):
    """(input_ids, labels, truncated) of prompt + answer, labels only on the answer's assistant tokens."""
    ids, labels = tokenize_conversation(tokenizer, prompt + answer, train_on_prompt=False, label_from=len(prompt))
    cut = len(ids) > max_seq_len
    return ids[:max_seq_len], labels[:max_seq_len], cut


def _labelled(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # position 0 is never a target


def preference_sample(tokenizer, row: dict, fmt: str, max_seq_len: int) -> tuple[dict | None, int]:
    """(sample, number of its sequences cut to max_seq_len); sample None when truncation left a
    sequence without any labelled token (the caller counts it as dropped). Raises BadRow."""
    prompt = _prompt(row)
    if fmt == "preference":
        chosen = _answer_tokens(tokenizer, prompt, _turns(row, "chosen", answer=True), max_seq_len)
        rejected = _answer_tokens(tokenizer, prompt, _turns(row, "rejected", answer=True), max_seq_len)
        cut = int(chosen[2]) + int(rejected[2])
        if not (_labelled(chosen[1]) and _labelled(rejected[1])):
            return None, cut
        return {"chosen_ids": chosen[0], "chosen_labels": chosen[1],
                "rejected_ids": rejected[0], "rejected_labels": rejected[1]}, cut
    if fmt == "kto":
        desirable = _desirable(row)
        ids, labels, cut = _answer_tokens(tokenizer, prompt, _turns(row, "completion", answer=True), max_seq_len)
        if not _labelled(labels):
            return None, int(cut)
        return {"input_ids": ids, "labels": labels, "desirable": desirable}, int(cut)
    raise ValueError(f"unknown preference format {fmt}")


def add_kl_pairs(samples: list[dict], max_seq_len: int) -> None:
    """KTO: give sample i the mismatched sequence prompt_i + completion_{i-1} (see module docstring).
    The prompt is every token before the first label; the completion is the rest."""
    def split(sample):
        first = next(i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        return sample["input_ids"][:first], sample["input_ids"][first:], sample["labels"][first:]

    parts = [split(s) for s in samples]
    for i, sample in enumerate(samples):
        prompt_ids = parts[i][0]
        _, completion_ids, completion_labels = parts[i - 1]
        sample["kl_input_ids"] = (prompt_ids + completion_ids)[:max_seq_len]
        sample["kl_labels"] = ([IGNORE_INDEX] * len(prompt_ids) + completion_labels)[:max_seq_len]


def sample_length(sample: dict) -> int:
    """The widest row the sample adds to a batch (what length grouping sorts by)."""
    if "chosen_ids" in sample:
        return max(len(sample["chosen_ids"]), len(sample["rejected_ids"]))
    return max(len(sample["input_ids"]), len(sample.get("kl_input_ids", ())))


def sample_token_counts(sample: dict) -> tuple[int, int]:
    """(tokens, labelled tokens) the sample trains on (both answers of a pair)."""
    if "chosen_ids" in sample:
        labels = sample["chosen_labels"] + sample["rejected_labels"]
        return len(sample["chosen_ids"]) + len(sample["rejected_ids"]), sum(x != IGNORE_INDEX for x in labels)
    return len(sample["input_ids"]), sum(x != IGNORE_INDEX for x in sample["labels"])


def collate_pairs(samples: list[dict], pad_token_id: int) -> dict:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded (``collate``), so one
    forward scores both answers; ``ref_logps`` (2B,) in the same order when every sample has them."""
    rows = ([{"input_ids": s["chosen_ids"], "labels": s["chosen_labels"]} for s in samples]
            + [{"input_ids": s["rejected_ids"], "labels": s["rejected_labels"]} for s in samples])
    batch = collate(rows, pad_token_id)
    if all("ref_logps" in s for s in samples):
        batch["ref_logps"] = torch.tensor([s["ref_logps"][0] for s in samples] + [s["ref_logps"][1] for s in samples],
                                          dtype=torch.float32)
    return batch


def collate_kto(samples: list[dict], pad_token_id: int) -> dict:
    """The completions (B, T) with their ``desirable`` flags, and the mismatched KL sequences (B, T')."""
    batch = collate(samples, pad_token_id)
    batch["desirable"] = torch.tensor([bool(s["desirable"]) for s in samples], dtype=torch.bool)
    kl = collate([{"input_ids": s["kl_input_ids"], "labels": s["kl_labels"]} for s in samples], pad_token_id)
    batch.update(kl_input_ids=kl["input_ids"], kl_labels=kl["labels"], kl_attention_mask=kl["attention_mask"])
    if all("ref_logps" in s for s in samples):
        batch["ref_logps"] = torch.tensor([s["ref_logps"] for s in samples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([s["ref_kl_logps"] for s in samples], dtype=torch.float32)
    return batch


def collate_for(samples: list[dict]):
    """The collate function for samples of this kind (pairs or KTO)."""
    return collate_pairs if samples and "chosen_ids" in samples[0] else collate_kto


def make_preference_batches(samples: list[dict], batch_size: int, pad_token_id: int, packing: bool,
                            max_seq_len: int, shuffle: bool, seed: int, group_by_length: bool = False) -> list[dict]:
    """Batches of ``batch_size`` samples (pairs or KTO rows), a pure function of the samples,
    ``seed`` and the settings, planned exactly as SFT batches are (``plan_batches``); the same
    signature as ``make_batches``, but never packed (each sequence is summed on its own row)."""
    if packing:
        raise LorakitError("data.packing is not supported for preference rows yet; set data.packing: false")
    lengths = [sample_length(s) for s in samples]
    plan = plan_batches(lengths, batch_size, False, max_seq_len, shuffle, seed, group_by_length)
    collate_fn = collate_for(samples)
    return [collate_fn([samples[row[0]] for row in batch], pad_token_id) for batch in plan]
