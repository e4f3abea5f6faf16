"""Fuzzed training configs: YAML files, dicts and key=value overrides of every section.

Property: ``load_config`` / ``TrainingConfig.from_dict`` / ``parse_override`` return a config or
raise LorakitError with a one-line message; never another exception, never a hang.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzz_common import counted, fuzz_settings, outcome, time_limit
from lorakit._dataclass_config import field_names
from lorakit.adapters import ADAPTER_METHODS
from lorakit.config import TrainArgs, TrainingConfig, load_config, parse_override
from lorakit.data import DataConfig

METHODS = sorted(ADAPTER_METHODS)
SECTIONS = {"lora": None, "data": DataConfig, "train": TrainArgs}  # lora: the method's config class
# Strings the validators compare against, so that generated configs often get past the first check.
WORDS = ["auto", "lora", "none", "all", "all-linear", "q_proj", "v_proj", "linear", "cosine", "constant",
         "fp32", "bf16", "nf4", "int8", "fp4", "pissa", "pissa_niter_4", "gaussian", "houlsby", "pfeiffer",
         "relu", "chat", "alpaca", "text", "sharegpt", "1e-4", "true", "nan", "-1", "", " ", "train.jsonl",
         "a\nb", "\u2028", "x" * 300, "'quoted'", "{", "[", "%", "=", "float32", "bfloat16", "lora_only"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=64),
    st.integers(),  # huge ints too
    st.sampled_from([0, 1, -1, 2**31, 2**63, -2**63, 10**40]),
    st.floats(),  # NaN, inf, subnormals, negatives
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-4, -1e-4, math.nan, math.inf, -math.inf, 1e308]),
    st.sampled_from(WORDS), st.text(max_size=12),
)
keys = st.one_of(st.text(max_size=10), st.sampled_from(WORDS), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=8)


def _section_names(section: str, method) -> list[str]:
    if section == "lora":
        cls = ADAPTER_METHODS.get(method if isinstance(method, str) else "lora", ADAPTER_METHODS["lora"]).config_class
        return field_names(cls) + ["peft_type", "layer_replication", "use_qalora"]  # peft's extra keys
    return field_names(SECTIONS[section])


@st.composite
def sections(draw, section: str, method):
    """A dict for one section: mostly its own keys (valid or not), some unknown ones."""
    names = _section_names(section, method)
    chosen = draw(st.lists(st.sampled_from(names), max_size=6, unique=True))
    result = {name: draw(values) for name in chosen}
    if draw(st.integers(0, 5)) == 0:
        result[draw(keys)] = draw(values)
    return result


methods = st.one_of(st.sampled_from(METHODS), st.sampled_from(METHODS), st.text(max_size=8), values)


@st.composite
def config_dicts(draw):
    """A training config dict: any subset of the top-level keys, each section mostly well-keyed."""
    method = draw(methods)
    data = {}
    if draw(st.booleans()):
        data["method"] = method
    for section in SECTIONS:
        choice = draw(st.integers(0, 6))
        if choice == 0:
            data[section] = draw(values)  # a section that is not a mapping, or None
        elif choice > 2:
            data[section] = draw(sections(section, method))
    for key in ("model", "output_dir"):
        if draw(st.booleans()):
            data[key] = draw(st.one_of(st.text(max_size=12), values))
    if draw(st.integers(0, 8)) == 0:
        data[draw(keys)] = draw(values)
    return data


def _dotted_key(draw, method) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=12))  # anything, dots and '=' included
    if kind <= 2:
        return draw(st.sampled_from(["model", "method", "output_dir", "lora", "data", "train"]))
    section = draw(st.sampled_from(list(SECTIONS)))
    key = draw(st.sampled_from(_section_names(section, method))) if kind < 9 else draw(st.text(max_size=6))
    return f"{section}.{key}" + (draw(st.sampled_from([".x", ".", ".a.b"])) if draw(st.integers(0, 12)) == 0 else "")


@st.composite
def overrides(draw, method):
    """key=value strings: YAML-dumped values, raw text values, and malformed overrides."""
    result = []
    for _ in range(draw(st.integers(0, 4))):
        key = _dotted_key(draw, method)
        kind = draw(st.integers(0, 5))
        if kind == 0:
            result.append(draw(st.text(max_size=20)))  # maybe no '=' at all
        elif kind == 1:
            result.append(f"{key}={draw(st.text(max_size=16))}")
        else:
            value = yaml.safe_dump(draw(values), default_flow_style=True, width=10**6).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            result.append(f"{key}={value}")
    return result


# YAML text with the language's sharper corners: anchors, aliases, tags, flow collections, tabs.
yaml_fragments = st.sampled_from([
    "model: x\n", "method: lora\n", "method: adalora\n", "lora:\n  r: 4\n", "train: {lr: 1e-3}\n", "a: &a [*a]\n",
    "x: &x {k: 1}\ny: *x\n", "lora: !!binary aGVsbG8=\n", "train: !!set {a, b}\n", "data: {train: 2001-12-14}\n",
    "model: !!python/object:os.system ls\n", "output_dir: ~\n", "- a\n- b\n", "train:\n\tlr: 1\n", "? [a]\n: 1\n",
    "lora: {r: 8, r: 9}\n", "data: [\n", "'unterminated\n", "%YAML 1.2\n---\n", "---\n...\n", "\x00\n", "\ufeff",
    "train: {lr: .inf}\n", "train: {lr: -.inf, epochs: .nan}\n", "lora: {target_modules: [q_proj, [v_proj]]}\n",
    "<<: {model: m}\n", "train: {<<: *a}\n", "train: {lr: &s [*s]}\n", "&r lora: 1\n", "key: |\n  block\n  text\n",
    "output_dir: 'a\\nb'\n",
    # the "billion laughs": 8**8 values once the aliases are expanded
    "l0: &l0 [x, x, x, x, x, x, x, x]\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 8)}]\n" for i in range(1, 8)),
])


@st.composite
def yaml_texts(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.text(max_size=60))
    if kind == 4:  # bytes that are not UTF-8 (or are, by chance)
        text = yaml.safe_dump(draw(config_dicts())).encode()
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    if kind == 1:
        return "".join(draw(st.lists(yaml_fragments, max_size=5)))
    text = yaml.safe_dump(draw(config_dicts()), sort_keys=False)
    if kind == 3 and text:  # one random edit
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet=":[]{}&*!|>-'\"#\t\n ", max_size=3)) + text[at + draw(st.integers(0, 3)):]
    return text


def _deep(depth: int, kind: str) -> str:
    return {"list": "train: " + "[" * depth + "]" * depth + "\n",
            "dict": "train: " + "{a: " * depth + "1" + "}" * depth + "\n",
            "block": "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v\n"}[kind]


def _check_config(config):
    assert isinstance(config, TrainingConfig)
    assert type(config.lora) is ADAPTER_METHODS[config.method].config_class
    assert isinstance(config.data, DataConfig) and isinstance(config.train, TrainArgs)
    # NaN / inf must not get through a range check: a run with lr inf or epochs inf is no run
    numbers = [getattr(config.train, f.name) for f in dataclasses.fields(TrainArgs)]
    numbers += [getattr(config.lora, name, 0) for name in ("lora_alpha", "lora_dropout", "reduction_factor",
                                                            "orth_reg_weight", "adapter_dropout")]
    for value in numbers:
        if isinstance(value, float):
            assert math.isfinite(value), f"a non-finite number is accepted: {config}"


def check_dict(data: dict) -> None:
    with counted("config"), time_limit(10, "TrainingConfig.from_dict"):
        config, _ = outcome(TrainingConfig.from_dict, data)
        if config is not None:
            _check_config(config)
            again, message = outcome(TrainingConfig.from_dict, config.to_dict())  # what it writes, it reads
            assert message is None, f"to_dict() of a valid config is refused: {message}"


def check_yaml(text: str | bytes, extra: list[str]) -> None:
    with counted("config"), time_limit(10, "load_config"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass"))
        config, _ = outcome(load_config, path, extra)
        if config is not None:
            _check_config(config)


def check_overrides(base: dict, extra: list[str]) -> None:
    with counted("config"), time_limit(10, "load_config with overrides"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(base), encoding="utf-8")
        for text in extra:
            outcome(parse_override, text)
        config, _ = outcome(load_config, path, extra)
        if config is not None:
            _check_config(config)


@st.composite
def dict_and_overrides(draw):
    base = draw(config_dicts())
    return base, draw(overrides(base.get("method", "lora")))


# --- fast tier ------------------------------------------------------------------------------

@fuzz_settings(120)
@given(config_dicts())
def test_from_dict_fast(data):
    check_dict(data)


@fuzz_settings(80)
@given(yaml_texts(), overrides("lora"))
def test_yaml_file_fast(text, extra):
    check_yaml(text, extra)


@fuzz_settings(80)
@given(dict_and_overrides())
def test_overrides_fast(case):
    check_overrides(*case)


@pytest.mark.parametrize("kind", ["list", "dict", "block"])
@pytest.mark.parametrize("depth", [50, 5000])
def test_deeply_nested_yaml(kind, depth):
    check_yaml(_deep(depth, kind), [])


# --- long tier ------------------------------------------------------------------------------

@pytest.mark.long
@fuzz_settings(2500)
@given(config_dicts())
def test_from_dict_long(data):
    check_dict(data)


@pytest.mark.long
@fuzz_settings(1500)
@given(yaml_texts(), overrides("lora"))
def test_yaml_file_long(text, extra):
    check_yaml(text, extra)


@pytest.mark.long
@fuzz_settings(1500)
@given(dict_and_overrides())
def test_overrides_long(case):
    check_overrides(*case)
