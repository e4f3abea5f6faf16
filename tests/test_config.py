"""The training config: YAML + key=value overrides onto dataclasses; unknown keys are errors."""

from __future__ import annotations

import pytest

from lorakit.adapters import LoraConfig
from lorakit.config import TrainArgs, TrainingConfig, apply_overrides, load_config, parse_override
from lorakit.data import DataConfig
from lorakit.errors import LorakitError

YAML = """
model: smollm2-135m-instruct
lora:
  r: 16
  lora_alpha: 32
  target_modules: [q_proj, v_proj]
data:
  train: train.jsonl
  max_seq_len: 256
train:
  lr: 1e-4
  epochs: 2
output_dir: out
"""


def _write(tmp_path, text=YAML):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_typed_dataclasses(tmp_path):
    config = load_config(_write(tmp_path))
    assert isinstance(config.lora, LoraConfig) and isinstance(config.data, DataConfig)
    assert isinstance(config.train, TrainArgs)
    assert config.lora.r == 16 and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)  # YAML 1.1 reads 1e-4 as str
    assert config.train.epochs == 2 and config.data.max_seq_len == 256 and config.output_dir == "out"
    assert config.train.batch_size == TrainArgs().batch_size  # defaults fill the rest


def test_defaults_without_file():
    config = load_config(None)
    assert config.model == "smollm2-135m-instruct" and config.method == "lora"
    assert config.train.scheduler == "linear" and config.train.precision == "auto"
    assert config.train.loraplus_lr_ratio is None


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    config = load_config(_write(tmp_path), ["train.lr=3e-4", "lora.r=8", "lora.target_modules=[up_proj,down_proj]",
                                           "data.packing=true", "train.resume=true", "model=other-model",
                                           "train.loraplus_lr_ratio=16"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.lora.r == 8 and config.lora.target_modules == ["up_proj", "down_proj"]
    assert config.data.packing is True and config.train.resume is True and config.model == "other-model"
    assert config.train.loraplus_lr_ratio == 16
    with pytest.raises(LorakitError, match="train.batch_size must be an integer >= 1"):
        load_config(_write(tmp_path), ["train.batch_size=0"])
    with pytest.raises(LorakitError, match="r must be a positive integer"):
        load_config(_write(tmp_path), ["lora.r=-1"])


@pytest.mark.parametrize("override, key, suggestion", [
    ("modle=x", "modle", "model"),
    ("train.lrr=1", "lrr", "lr"),
    ("train.grad_acum=2", "grad_acum", "grad_accum"),
    ("data.max_seq=12", "max_seq", "max_seq_len"),
    ("lora.lora_alpah=4", "lora_alpah", "lora_alpha"),
])
def test_unknown_keys_rejected_with_closest_suggestion(tmp_path, override, key, suggestion):
    with pytest.raises(LorakitError) as info:
        load_config(_write(tmp_path), [override])
    message = str(info.value)
    assert f"unknown key '{key}'" in message and f"did you mean '{suggestion}'" in message
    assert "\n" not in message
    # issue 14: the mistake is named where it is, on the command line, not as if in the file
    assert f"command-line override '{override}'" in message and "run.yaml" not in message


def test_invalid_file_is_reported_as_the_file_even_with_valid_overrides(tmp_path):
    path = _write(tmp_path, YAML + "bogus_top: 1\n")
    with pytest.raises(LorakitError) as info:
        load_config(path, ["train.lr=1e-3"])
    assert str(path) in str(info.value) and "override" not in str(info.value)
    later = load_config(_write(tmp_path), ["train.lr=1e-3", "train.batch_size=2"])  # all valid: no error
    assert later.train.batch_size == 2


def test_unknown_key_in_yaml_file_names_the_file_and_section(tmp_path):
    path = _write(tmp_path, YAML.replace("  epochs: 2", "  epoch: 2"))
    with pytest.raises(LorakitError, match=r"run.yaml section 'train'.*did you mean 'epochs'"):
        load_config(path)


def test_invalid_choices_and_shapes(tmp_path):
    with pytest.raises(LorakitError, match="did you mean 'cosine'"):
        load_config(_write(tmp_path), ["train.scheduler=cosin"])
    with pytest.raises(LorakitError, match="valid choices: auto, fp32, bf16"):
        load_config(_write(tmp_path), ["train.precision=fp8"])
    with pytest.raises(LorakitError, match="unknown method 'lorra'"):
        load_config(_write(tmp_path), ["method=lorra"])
    with pytest.raises(LorakitError, match="must look like key=value"):
        parse_override("train.lr")
    with pytest.raises(LorakitError, match="'train' must be a mapping"):
        TrainingConfig.from_dict({"train": 3})
    with pytest.raises(LorakitError, match="is a value, not a section"):
        apply_overrides({"model": "x"}, ["model.sub=1"])
    bad = _write(tmp_path, "train:\n  lr: [1,\n")
    with pytest.raises(LorakitError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(LorakitError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_to_dict_round_trips(tmp_path):
    config = load_config(_write(tmp_path), ["train.loraplus_lr_ratio=4"])
    again = TrainingConfig.from_dict(config.to_dict())
    assert again == config


def test_relative_data_paths_fall_back_to_the_config_directory(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(_write(tmp_path))
    assert config.data.train == str(tmp_path / "train.jsonl")


# --- found by the config fuzzer (tests/fuzz/test_fuzz_config.py): one line, never a traceback ---

def _refused(call, *args) -> str:
    with pytest.raises(LorakitError) as info:
        call(*args)
    message = str(info.value)
    assert message and len(message.splitlines()) == 1, repr(message)
    return message


def test_unknown_key_that_is_not_a_string_is_named():
    """A YAML key like `5:` or `null:` reached difflib as an int and raised TypeError."""
    assert "unknown key 5 in config section 'train'" in _refused(TrainingConfig.from_dict, {"train": {5: 1}})
    assert "unknown key None" in _refused(TrainingConfig.from_dict, {None: 1})


def test_user_text_with_line_breaks_stays_on_one_line(tmp_path):
    """Keys, choices and overrides were quoted raw, so a '\\r' or '\\n' in them split the message."""
    assert "'bad\\nkey'" in _refused(TrainingConfig.from_dict, {"train": {"bad\nkey": 1}})
    _refused(TrainingConfig.from_dict, {"train": {"scheduler": "cos\nine"}})
    _refused(TrainingConfig.from_dict, {"method": "lo\rra"})
    _refused(TrainingConfig.from_dict, {"data": {"format": "chat\n"}})
    _refused(load_config, None, ["modle\n=1"])
    _refused(load_config, None, ["train.lr"])
    bad = _write(tmp_path, "model: \x12\n")  # yaml's own message has a second line
    assert "invalid YAML" in _refused(load_config, bad)


@pytest.mark.parametrize("data, fragment", [
    ({"method": ["lora"]}, "unknown method ['lora']"),  # unhashable: TypeError
    ({"method": "adapter", "lora": {"placement": []}}, "placement [] is unknown"),
    ({"lora": {"lora_dropout": {}}}, "lora_dropout must be in [0, 1)"),  # float({}): TypeError
    ({"lora": {"lora_dropout": "0.1"}}, "lora_dropout must be in [0, 1)"),
    ({"lora": {"lora_dropout": 10**400}}, "lora_dropout must be in [0, 1)"),  # float(): OverflowError
    ({"lora": {"lora_alpha": "sixteen"}}, "lora_alpha must be a number"),
    ({"lora": {"rank_pattern": [1]}}, "rank_pattern must map module names"),  # .items(): AttributeError
    ({"lora": {"alpha_pattern": {"q_proj": "x"}}}, "alpha_pattern['q_proj'] must be a number"),
    ({"method": "adalora", "lora": {"beta1": "x"}}, "beta1 must be in (0, 1)"),
    ({"method": "adalora", "lora": {"orth_reg_weight": None}}, "orth_reg_weight must be >= 0"),
    ({"data": {"eval_ratio": "auto"}}, "eval_ratio must be in [0, 1)"),  # float('auto'): ValueError
    ({"data": {"train": {"path": "a"}}}, "data.train must be a file or directory path"),
    ({"train": {"lr": float("inf")}}, "train.lr must be a finite number"),  # inf passed '> 0'
    ({"train": {"epochs": float("inf")}}, "train.epochs must be a finite number"),
    ({"train": {"compact_memory": "sometimes"}}, "train.compact_memory must be true, false or auto"),
])
def test_values_of_the_wrong_type_or_not_finite_are_refused(data, fragment):
    assert fragment in _refused(TrainingConfig.from_dict, data)


def test_a_date_as_data_path_is_refused(tmp_path):
    """YAML reads 2001-12-14 as a date; resolving it as a path raised TypeError after validation."""
    assert "data.train must be a file or directory path" in _refused(load_config, _write(tmp_path, "data: {train: 2001-12-14}\n"))


def test_config_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model: \xff\xfe\n")
    assert "not UTF-8 text (byte 7)" in _refused(load_config, path)


@pytest.mark.parametrize("text", [
    "a: &a [*a]\n",  # an alias inside itself: RecursionError
    "train: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting past Python's recursion limit
    "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(  # the "billion laughs": 9**9 values once expanded
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)) + "train: {lr: *l8}\n",
], ids=["alias inside itself", "nested 5000 deep", "billion laughs"])
def test_yaml_that_never_ends_or_explodes_is_refused_quickly(tmp_path, text):
    import time

    start = time.perf_counter()
    assert "nested deeper than 64 levels or more than 100000 values" in _refused(load_config, _write(tmp_path, text))
    assert time.perf_counter() - start < 10
    assert "nested deeper" in _refused(load_config, None, ["train.lr=&a [*a]"])
