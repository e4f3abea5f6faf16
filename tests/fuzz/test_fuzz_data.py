"""Fuzzed data files of every container and format, read with the real SmolLM2 tokenizer.

Property: ``build_datasets`` returns well-formed samples or raises LorakitError with one line;
a row error names the file and the line (JSONL) or row; with ``skip_bad_rows`` a bad row alone
never stops the load (only whole-file problems do: empty, all rows bad, all labels masked,
a file that cannot be parsed at all).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_common import counted, fuzz_settings, outcome, time_limit
from lorakit.data import FORMATS, IGNORE_INDEX, DataConfig, build_datasets

# Text with the characters that matter here: template markers, newlines, NUL, a lone surrogate,
# line and paragraph separators, right-to-left marks, and plain words.
SPECIAL = ["<|im_start|>", "<|im_end|>", "{{ x }}", "{% if %}", "\n", "\r\n", "\x00", "\ud800", "\u2028", "\u202e",
           "\ufeff", "  ", "assistant", "\\", '"', ",", "'"]
texts = st.one_of(
    st.text(max_size=12), st.sampled_from(["", " ", "\n", "Hi", "Hello there.", "ok"]),
    st.lists(st.sampled_from(SPECIAL + ["word", "x"]), max_size=6).map("".join),
    st.integers(1, 3).map(lambda n: "word " * (3000 * n)),  # huge rows
)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=5)
field_values = st.one_of(texts, texts, texts, json_values)
ROLES = ["system", "user", "assistant", "tool", "robot", "", "USER"]
FROMS = ["human", "user", "gpt", "assistant", "system", "bot"]


@st.composite
def turns(draw, role_key: str, content_key: str, roles: list[str]):
    """Mostly alternating user/assistant turns; sometimes any order, roles and values."""
    n = draw(st.integers(0, 5))
    if draw(st.booleans()):
        order = [roles[1], roles[3]] * 3
        names = order[:n] if not draw(st.booleans()) else ([roles[4]] + order)[:n]
    else:
        names = draw(st.lists(st.sampled_from(roles), min_size=n, max_size=n))
    result = [{role_key: name, content_key: draw(texts)} for name in names]
    for turn in result:
        if draw(st.integers(0, 9)) == 0:
            turn[draw(st.sampled_from([role_key, content_key]))] = draw(json_values)
        if draw(st.integers(0, 19)) == 0:
            del turn[draw(st.sampled_from([role_key, content_key]))]
    if draw(st.integers(0, 19)) == 0:
        result.append(draw(json_values))  # a turn that is not an object
    return result


FORMAT_KEYS = {"alpaca": ["instruction", "input", "output", "system"], "prompt_completion": ["prompt", "completion", "system"],
               "text": ["text"]}


@st.composite
def rows(draw, fmt: str):
    """A row of ``fmt`` with random mistakes: missing fields, wrong types, empty or huge strings."""
    if fmt == "chat":
        row = {"messages": draw(turns("role", "content", ROLES[:2] + ["user", "user", "assistant", "system", "robot"]))}
    elif fmt == "sharegpt":
        row = {"conversations": draw(turns("from", "value", FROMS[:2] + ["human", "human", "gpt", "system", "bot"]))}
    else:
        row = {key: draw(texts) for key in FORMAT_KEYS[fmt] if key in ("instruction", "output", "prompt", "completion",
                                                                          "text") or draw(st.booleans())}
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.integers(0, 3))
        if kind == 0 and row:
            del row[draw(st.sampled_from(sorted(row)))]
        elif kind == 1 and row:
            row[draw(st.sampled_from(sorted(row)))] = draw(field_values)
        elif kind == 2:
            row[draw(st.sampled_from(["extra", "id", "messages", "text", "prompt"]))] = draw(field_values)
    return row


ROW_FORMATS = ["alpaca", "chat", "sharegpt", "prompt_completion", "text"]


@st.composite
def jsonl_lines(draw, fmt: str) -> list[bytes]:
    """Lines of a JSONL file: rows of ``fmt`` (sometimes of another format), blank lines,
    truncated JSON, values that are not objects, and bytes that are not UTF-8."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 12))
        row = draw(rows(fmt if kind < 9 else draw(st.sampled_from(ROW_FORMATS))))
        line = json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", errors="surrogatepass")
        if kind == 9:
            line = line[: draw(st.integers(0, max(len(line) - 1, 0)))]  # truncated
        elif kind == 10:
            line = draw(st.sampled_from([b"", b"   ", b"\t", b"[1, 2]", b"null", b"\"text\"", b"NaN", b"\xef\xbb\xbf{}"]))
        elif kind == 11:
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\x00"])) + line[at:]
        lines.append(line)
    return lines


def _csv_text(draw, fmt: str) -> str:
    data = [draw(rows(fmt)) for _ in range(draw(st.integers(0, 5)))]
    header = sorted({key for row in data for key in row}) or FORMAT_KEYS.get(fmt, ["messages"])
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    writer = csv.writer(buffer, quoting=quoting, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    for row in data:
        writer.writerow([row.get(key, "") if isinstance(row.get(key, ""), str) else json.dumps(row[key])
                         for key in header])
    text = buffer.getvalue()
    for _ in range(draw(st.integers(0, 2))):  # odd quoting: a stray quote, delimiter or line break
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"', '""', ",", "\n", "\r", '"a"b', "\ufeff"])) + text[at:]
    return text


@st.composite
def data_files(draw):
    """(suffix, bytes) of a data file in any container, mostly in ``fmt``."""
    fmt = draw(st.sampled_from(ROW_FORMATS))
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".jsonl", ".json", ".csv", ".parquet"]))
    if suffix == ".jsonl":
        lines = draw(jsonl_lines(fmt))
        return fmt, suffix, draw(st.sampled_from([b"\n", b"\r\n"])).join(lines) + draw(st.sampled_from([b"\n", b""]))
    if suffix == ".json":
        data = [draw(rows(fmt)) for _ in range(draw(st.integers(0, 4)))]
        shape = draw(st.integers(0, 5))
        value = {0: data, 1: {"data": data}, 2: data[0] if data else {}, 3: draw(json_values)}.get(shape, data)
        if shape == 4:  # JSON Lines under a .json name
            text = "\n".join(json.dumps(row) for row in data)
        else:
            text = json.dumps(value)
        raw = text.encode("utf-8", errors="surrogatepass")
        if shape == 5:
            raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
        return fmt, suffix, raw
    if suffix == ".csv":
        return fmt, suffix, _csv_text(draw, fmt).encode("utf-8", errors="surrogatepass")
    return fmt, suffix, draw(parquet_bytes(fmt))


@st.composite
def parquet_bytes(draw, fmt: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [draw(rows(fmt)) for _ in range(draw(st.integers(1, 4)))]
    try:
        table = pa.Table.from_pylist(data)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types: store them as JSON text
        table = pa.Table.from_pylist([{k: json.dumps(v) for k, v in row.items()} for row in data])
    buffer = io.BytesIO()
    try:
        pq.write_table(table, buffer)
    except (pa.ArrowException, ValueError):
        return b"PAR1 not really parquet"
    raw = buffer.getvalue()
    if draw(st.integers(0, 4)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    return raw


data_configs = st.fixed_dictionaries({
    "format": st.sampled_from(FORMATS + ("auto", "auto")),
    "max_seq_len": st.sampled_from([2, 3, 16, 64, 512]),
    "train_on_prompt": st.booleans(),
    "skip_bad_rows": st.booleans(),
    "eval_ratio": st.sampled_from([0.0, 0.0, 0.0, 0.5, 0.9]),
})



def check_data(tokenizer, file, options: dict) -> None:
    fmt, suffix, raw = file
    with counted("data"), time_limit(60, "build_datasets"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train{suffix}"
        path.write_bytes(raw)
        config = DataConfig(train=str(path), **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, message = outcome(build_datasets, config, tokenizer)
        if message is not None:
            at_row = re.match(re.escape(str(path)) + r" (line|row) \d+: ", message)
            if message.endswith("fix the row or set data.skip_bad_rows: true"):  # a row error
                assert at_row, f"row error without its file and line: {message}"
            if config.skip_bad_rows:
                assert not (at_row and "fix the file" not in message), \
                    f"skip_bad_rows: true, yet one bad row stops the load: {message}"
            return
        train, evaluation, stats = result
        assert train and stats.train_samples == len(train)
        for sample in train + (evaluation or []):
            ids, labels = sample["input_ids"], sample["labels"]
            assert len(ids) == len(labels) <= config.max_seq_len
            assert all(isinstance(t, int) for t in ids)
            assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
            assert any(label != IGNORE_INDEX for label in labels[1:])


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """CSV and Parquet go through ``datasets``, which leaves a cache entry per file read: keep the
    thousands of fuzzed files out of the user's cache."""
    import datasets

    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("datasets-cache")
    yield
    datasets.config.HF_DATASETS_CACHE = saved


# --- fast tier ------------------------------------------------------------------------------

@fuzz_settings(150)
@given(file=data_files(), options=data_configs)
def test_data_files_fast(smol_tokenizer, file, options):
    check_data(smol_tokenizer, file, options)


# --- long tier ------------------------------------------------------------------------------

@pytest.mark.long
@fuzz_settings(3000)
@given(file=data_files(), options=data_configs)
def test_data_files_long(smol_tokenizer, file, options):
    check_data(smol_tokenizer, file, options)
