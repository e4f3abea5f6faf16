"""Each row format and each file container becomes the right conversation / text."""

import pytest

from helpers import labelled_runs, write_container, write_jsonl
from lorakit.data import DataConfig, build_datasets, render_chat

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue"}]
PROMPT_COMPLETION = [{"prompt": "Capital of France?", "completion": "Paris", "system": "Be terse."}]
CHAT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, human."}]}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "You are a cat."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Meow."}]}]
TEXT = [{"text": "The quick brown fox."}]


def _ids(tok, messages):
    return tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_alpaca_joins_instruction_and_input(tmp_path, smol_tokenizer, fmt):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, _, stats = build_datasets(DataConfig(train=path, format="auto" if fmt == "auto" else "alpaca"), smol_tokenizer)
    assert stats.format == "alpaca" and len(train) == 2
    assert train[0]["input_ids"] == _ids(smol_tokenizer, [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                                          {"role": "assistant", "content": "5"}])
    assert train[1]["input_ids"] == _ids(smol_tokenizer, [{"role": "user", "content": "Name a colour."},
                                                          {"role": "assistant", "content": "Blue"}])
    assert [smol_tokenizer.decode(r) for r in labelled_runs(train[0])] == ["5<|im_end|>"]


def test_prompt_completion_keeps_system(tmp_path, smol_tokenizer):
    train, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "p.jsonl", PROMPT_COMPLETION)),
                                     smol_tokenizer)
    assert stats.format == "prompt_completion"
    text = smol_tokenizer.decode(train[0]["input_ids"])
    assert "Be terse." in text and "helpful AI assistant" not in text  # the given system replaces the default
    assert [smol_tokenizer.decode(r) for r in labelled_runs(train[0])] == ["Paris<|im_end|>"]


def test_sharegpt_maps_roles(tmp_path, smol_tokenizer):
    train, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "s.jsonl", SHAREGPT)), smol_tokenizer)
    assert stats.format == "sharegpt"
    assert train[0]["input_ids"] == _ids(smol_tokenizer, [{"role": "system", "content": "You are a cat."},
                                                          {"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Meow."}])


def test_text_labels_every_token_and_appends_eos(tmp_path, smol_tokenizer):
    train, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", TEXT)), smol_tokenizer)
    assert stats.format == "text"
    sample = train[0]
    assert sample["labels"] == sample["input_ids"]
    assert sample["input_ids"] == smol_tokenizer("The quick brown fox.")["input_ids"] + [smol_tokenizer.eos_token_id]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dir"])
def test_containers_give_identical_samples(tmp_path, smol_tokenizer, kind):
    reference, _, _ = build_datasets(DataConfig(train=write_jsonl(tmp_path / "ref.jsonl", ALPACA)), smol_tokenizer)
    (tmp_path / kind).mkdir()
    train, _, stats = build_datasets(DataConfig(train=write_container(tmp_path / kind, kind, ALPACA)), smol_tokenizer)
    assert stats.format == "alpaca" and train == reference


@pytest.mark.parametrize("kind", ["parquet", "dir"])
def test_nested_chat_rows_in_parquet_and_saved_dir(tmp_path, smol_tokenizer, kind):
    reference, _, _ = build_datasets(DataConfig(train=write_jsonl(tmp_path / "ref.jsonl", CHAT)), smol_tokenizer)
    train, _, stats = build_datasets(DataConfig(train=write_container(tmp_path, kind, CHAT)), smol_tokenizer)
    assert stats.format == "chat" and train == reference


@pytest.mark.parametrize("rows,expected", [(ALPACA, "alpaca"), (PROMPT_COMPLETION, "prompt_completion"),
                                           (CHAT, "chat"), (SHAREGPT, "sharegpt"), (TEXT, "text")])
def test_auto_detection(tmp_path, smol_tokenizer, rows, expected):
    _, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows)), smol_tokenizer)
    assert stats.format == expected


def test_eval_file_and_eval_ratio(tmp_path, smol_tokenizer):
    rows = [{"text": f"document number {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, evaluation, stats = build_datasets(DataConfig(train=path, eval_ratio=0.3, seed=1), smol_tokenizer)
    assert (len(train), len(evaluation), stats.eval_samples) == (7, 3, 3)
    assert not {tuple(s["input_ids"]) for s in train} & {tuple(s["input_ids"]) for s in evaluation}
    again, _, _ = build_datasets(DataConfig(train=path, eval_ratio=0.3, seed=1), smol_tokenizer)
    other, _, _ = build_datasets(DataConfig(train=path, eval_ratio=0.3, seed=2), smol_tokenizer)
    assert again == train and other != train
    _, evaluation, _ = build_datasets(DataConfig(train=path, eval=write_jsonl(tmp_path / "e.jsonl", CHAT)),
                                      smol_tokenizer)
    assert len(evaluation) == 1
    _, evaluation, _ = build_datasets(DataConfig(train=path), smol_tokenizer)
    assert evaluation is None
