"""Preference and KTO rows: detection, the chat template as in SFT with the prompt shared and
masked, errors with file and line, KTO's mismatched KL pairs, and the pair batches."""

import json

import pytest

from helpers import write_container, write_jsonl
from lorakit.data import IGNORE_INDEX, DataConfig, build_datasets
from lorakit.data.preference import collate_pairs, make_preference_batches
from lorakit.data.templates import tokenize_conversation
from lorakit.errors import LorakitError

PAIR = {"prompt": "What does len() return?", "chosen": "The number of items.", "rejected": "A string."}
CHAT_PAIR = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}


def _labelled_ids(ids, labels):
    return [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]


@pytest.mark.parametrize("row", [PAIR, CHAT_PAIR], ids=["strings", "messages"])
def test_pair_is_two_sft_conversations_sharing_the_masked_prompt(tmp_path, smol_tokenizer, row):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    train, _, stats = build_datasets(DataConfig(train=path), smol_tokenizer)
    assert stats.format == "preference" and len(train) == 1
    sample = train[0]
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    for side in ("chosen", "rejected"):
        answer = row[side] if isinstance(row[side], list) else [{"role": "assistant", "content": row[side]}]
        ids, labels = tokenize_conversation(smol_tokenizer, prompt + answer, False, label_from=len(prompt))
        assert (sample[f"{side}_ids"], sample[f"{side}_labels"]) == (ids, labels)  # exactly the SFT rendering
        reply = smol_tokenizer.decode(_labelled_ids(ids, labels))
        assert reply.startswith(answer[-1]["content"]) and "Hi?" not in reply and "What does" not in reply
    first_label = [next(i for i, x in enumerate(sample[f"{s}_labels"]) if x != IGNORE_INDEX) for s in ("chosen", "rejected")]
    assert first_label[0] == first_label[1]
    assert sample["chosen_ids"][:first_label[0]] == sample["rejected_ids"][:first_label[1]]  # the shared prompt


def test_kto_rows_detected_with_labels_and_mismatched_kl_pairs(tmp_path, smol_tokenizer):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}.", "label": i % 2 == 0} for i in range(3)]
    train, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "k.jsonl", rows)), smol_tokenizer)
    assert stats.format == "kto"
    assert [s["desirable"] for s in train] == [True, False, True]
    for i, sample in enumerate(train):
        kl_text = smol_tokenizer.decode(sample["kl_input_ids"])
        assert f"Question {i}?" in kl_text and f"Answer number {(i - 1) % 3}." in kl_text
        assert smol_tokenizer.decode(_labelled_ids(sample["kl_input_ids"], sample["kl_labels"])).startswith(
            f"Answer number {(i - 1) % 3}.")


BAD = [
    ({"prompt": "x", "chosen": "", "rejected": "y"}, "missing or empty field 'chosen'"),
    ({"prompt": "x", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "no assistant turn"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "a", "rejected": "b"}, "unknown role"),
    ({"prompt": "x", "completion": "a", "label": "maybe"}, "field 'label' must be true"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_bad_preference_row_names_file_and_line(tmp_path, smol_tokenizer, bad, reason):
    good = PAIR if "chosen" in bad else {"prompt": "x", "completion": "a", "label": True}
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, bad])
    with pytest.raises(LorakitError, match=rf"train\.jsonl line 3: .*{reason}") as err:
        build_datasets(DataConfig(train=path), smol_tokenizer)
    assert "\n" not in str(err.value)


def test_csv_kto_labels_and_eval_of_another_kind_is_an_error(tmp_path, smol_tokenizer):
    rows = [{"prompt": "p", "completion": "c", "label": "true"}, {"prompt": "q", "completion": "d", "label": "False"}]
    train, _, _ = build_datasets(DataConfig(train=write_container(tmp_path, "csv", rows)), smol_tokenizer)
    assert [s["desirable"] for s in train] == [True, False]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(LorakitError, match=r"chat\.jsonl: prompt_completion rows, but .*pairs\.jsonl has preference"):
        build_datasets(DataConfig(train=pairs, eval=chat), smol_tokenizer)
    with pytest.raises(LorakitError, match="train_on_prompt does not apply"):
        build_datasets(DataConfig(train=pairs, train_on_prompt=True), smol_tokenizer)


def test_pair_batches_hold_chosen_rows_then_rejected_rows(tmp_path, smol_tokenizer):
    rows = [dict(PAIR, prompt=f"{PAIR['prompt']} ({i})") for i in range(5)]
    train, _, _ = build_datasets(DataConfig(train=write_jsonl(tmp_path / "p.jsonl", rows)), smol_tokenizer)
    batches = make_preference_batches(train, 2, smol_tokenizer.pad_token_id, False, 1024, shuffle=True, seed=3,
                                      group_by_length=True)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]  # 2B rows: every pair once
    seen = sorted(json.dumps(b["input_ids"][i, : int(b["attention_mask"][i].sum())].tolist())
                  for b in batches for i in range(b["input_ids"].shape[0] // 2))
    assert seen == sorted(json.dumps(s["chosen_ids"]) for s in train)
    train[0]["ref_logps"] = (-1.5, -2.5)
    train[1]["ref_logps"] = (-3.0, -4.0)
    batch = collate_pairs(train[:2], smol_tokenizer.pad_token_id)
    assert batch["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert batch["input_ids"][2, : len(train[0]["rejected_ids"])].tolist() == train[0]["rejected_ids"]
