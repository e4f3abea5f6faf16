"""Bad rows name the file and line; skipping counts them; empty / all-masked data is an error."""

import json

import pytest

from helpers import write_container, write_jsonl
from lorakit.data import DataConfig, build_datasets
from lorakit.errors import LorakitError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
BAD_ROWS = [  # (line content, fragment of the reason)
    ('{"messages": [', "malformed JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}]}), "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}), "empty"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "no assistant turn"),
    (json.dumps({"messages": []}), "missing or empty field 'messages'"),
    (json.dumps({"messages": "Hi"}), "must be a list of turns"),
    (json.dumps({"prompt": "x"}), "missing or empty field 'messages'"),
    ("[1, 2]", "JSON object"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(tmp_path, smol_tokenizer, bad, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, "", bad, GOOD])
    with pytest.raises(LorakitError, match=rf"train\.jsonl line 4: .*{reason}") as err:
        build_datasets(DataConfig(train=path, format="chat"), smol_tokenizer)
    assert "\n" not in str(err.value)


def test_sharegpt_unknown_role_and_alpaca_missing_field(tmp_path, smol_tokenizer):
    share = [{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]
    with pytest.raises(LorakitError, match=r"s\.jsonl line 1: .*unknown from 'bot'"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "s.jsonl", share), format="sharegpt"), smol_tokenizer)
    alpaca = [{"instruction": "a", "output": "b"}, {"instruction": "  ", "output": "b"}]
    with pytest.raises(LorakitError, match=r"a\.jsonl line 2: missing or empty field 'instruction'"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "a.jsonl", alpaca)), smol_tokenizer)


def test_csv_bad_row_reports_row_number(tmp_path, smol_tokenizer):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": ""}]
    path = write_container(tmp_path, "csv", rows)
    with pytest.raises(LorakitError, match=r"data\.csv row 2: missing or empty field 'completion'"):
        build_datasets(DataConfig(train=path), smol_tokenizer)


def test_skip_bad_rows_counts_and_warns(tmp_path, smol_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] + [bad for bad, _ in BAD_ROWS] + [GOOD])
    with pytest.warns(UserWarning, match=rf"skipped {len(BAD_ROWS)} bad rows of {len(BAD_ROWS) + 2} .*line 2"):
        train, _, stats = build_datasets(DataConfig(train=path, format="chat", skip_bad_rows=True), smol_tokenizer)
    assert (len(train), stats.skipped) == (2, len(BAD_ROWS))
    assert f"{len(BAD_ROWS)} bad rows skipped" in str(stats)


def test_empty_and_all_bad_datasets_are_errors(tmp_path, smol_tokenizer):
    with pytest.raises(LorakitError, match=r"empty\.jsonl: the dataset is empty"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "empty.jsonl", ["", ""])), smol_tokenizer)
    with pytest.raises(LorakitError, match=r"bad\.jsonl: all 2 rows are bad"), pytest.warns(UserWarning):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "bad.jsonl", ["{", "{"]), skip_bad_rows=True),
                       smol_tokenizer)
    with pytest.raises(LorakitError, match="does not exist"):
        build_datasets(DataConfig(train=str(tmp_path / "missing.jsonl")), smol_tokenizer)


def test_truncation_count_and_all_masked_error(tmp_path, smol_tokenizer):
    long_prompt = {"prompt": "word " * 200, "completion": "ok"}
    short = {"prompt": "Hi", "completion": "Hello there, friend."}
    path = write_jsonl(tmp_path / "t.jsonl", [long_prompt, short, long_prompt])
    with pytest.raises(LorakitError, match=r"m\.jsonl: every label is masked in all 2 samples \(2 truncated"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "m.jsonl", [long_prompt] * 2), max_seq_len=64),
                       smol_tokenizer)
    with pytest.warns(UserWarning, match="dropped 2 samples"):
        train, _, stats = build_datasets(DataConfig(train=path, max_seq_len=64), smol_tokenizer)
    assert (len(train), stats.truncated, stats.dropped) == (1, 2, 2)
    text = [{"text": "word " * 200}, {"text": "short"}]
    train, _, stats = build_datasets(DataConfig(train=write_jsonl(tmp_path / "x.jsonl", text), max_seq_len=32),
                                     smol_tokenizer)
    assert stats.truncated == 1 and [len(s["input_ids"]) for s in train][0] == 32
    assert all(len(s["labels"]) == len(s["input_ids"]) <= 32 for s in train)


def test_undetectable_format_and_config_errors(tmp_path, smol_tokenizer):
    with pytest.raises(LorakitError, match=r"u\.jsonl line 1: cannot detect the data format"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "u.jsonl", [{"question": "a"}])), smol_tokenizer)
    with pytest.raises(LorakitError, match="did you mean 'max_seq_len'"):
        DataConfig(max_seq_length=512)
    with pytest.raises(LorakitError, match="did you mean 'sharegpt'"):
        DataConfig(format="sharegtp")
    with pytest.raises(LorakitError, match="not both"):
        DataConfig(train="a.jsonl", eval="b.jsonl", eval_ratio=0.1)
    with pytest.raises(LorakitError, match="unsupported type '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        build_datasets(DataConfig(train=str(tmp_path / "d.txt")), smol_tokenizer)


def test_training_reports_a_bad_row_before_loading_the_model(tmp_path, smol_tokenizer):
    """Issue 14: data errors came only after the model had loaded. The model directory here holds
    a tokenizer but no weights, so reaching the model load would fail with another error."""
    from lorakit.config import TrainingConfig
    from lorakit.training import train

    smol_tokenizer.save_pretrained(tmp_path / "model")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
                    + "\n" + "{not json\n")
    config = TrainingConfig.from_dict({"model": str(tmp_path / "model"), "data": {"train": str(path)},
                                       "output_dir": str(tmp_path / "out")})
    with pytest.raises(LorakitError, match=r"train\.jsonl line 2: malformed JSON"):
        train(config, progress=False)


# --- found by the data fuzzer (tests/fuzz/test_fuzz_data.py) ---------------------------------

def test_jsonl_line_that_is_not_utf8_is_a_bad_row(tmp_path, smol_tokenizer):
    """Reading the file as text raised UnicodeDecodeError from the middle of the loop."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff"}\n' + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(LorakitError, match=r"train\.jsonl line 2: not UTF-8 text \(byte 15 of the line\)") as err:
        build_datasets(DataConfig(train=str(path)), smol_tokenizer)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 bad rows of 3"):
        train, _, _ = build_datasets(DataConfig(train=str(path), skip_bad_rows=True), smol_tokenizer)
    assert len(train) == 2
    whole = tmp_path / "train.json"
    whole.write_bytes(b'[{"text": "\xff"}]')
    with pytest.raises(LorakitError, match=r"train\.json: not UTF-8 text \(byte 11\)"):
        build_datasets(DataConfig(train=str(whole)), smol_tokenizer)


def test_role_that_is_not_a_string_is_a_bad_row(tmp_path, smol_tokenizer):
    """{"role": {...}} was looked up in the role table and raised TypeError (unhashable)."""
    row = {"messages": [{"role": {"name": "user"}, "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(LorakitError, match=r"r\.jsonl line 1: messages\[1\] has unknown role \{'name': 'user'\}"):
        build_datasets(DataConfig(train=write_jsonl(tmp_path / "r.jsonl", [row])), smol_tokenizer)


@pytest.mark.parametrize("first, row, where", [
    (GOOD, {"messages": [{"role": "user", "content": "Hi \ud800"}, {"role": "assistant", "content": "Hello"}]},
     r"messages\[1\]\.content is not valid Unicode \(lone surrogate at character 4\)"),
    ({"prompt": "a", "completion": "b"}, {"prompt": "Hi", "completion": "\udfff"}, r"field 'completion' is not valid Unicode"),
    ({"text": "ok"}, {"text": "a\ud800b"}, r"field 'text' is not valid Unicode"),
])
def test_lone_surrogate_from_a_json_escape_is_a_bad_row(tmp_path, smol_tokenizer, first, row, where):
    """JSON's "\\ud800" decodes to a lone surrogate, which the tokenizer refused with a TypeError."""
    path = write_jsonl(tmp_path / "s.jsonl", [first, row])
    with pytest.raises(LorakitError, match=rf"s\.jsonl line 2: {where}"):
        build_datasets(DataConfig(train=path), smol_tokenizer)


def test_skip_bad_rows_skips_a_first_row_of_no_known_format(tmp_path, smol_tokenizer):
    """The format is detected from the first row; a first row of no known format stopped the
    load even with skip_bad_rows. Now it is a bad row, and the next row decides the format."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "a"}, GOOD, GOOD])
    with pytest.warns(UserWarning, match=r"skipped 1 bad rows of 3 .*line 1: cannot detect the data format"):
        train, _, stats = build_datasets(DataConfig(train=path, skip_bad_rows=True), smol_tokenizer)
    assert (len(train), stats.skipped, stats.format) == (2, 1, "chat")
    with pytest.raises(LorakitError, match=r"train\.jsonl line 1: cannot detect the data format .*skip_bad_rows"):
        build_datasets(DataConfig(train=path), smol_tokenizer)
