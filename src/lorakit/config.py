"""The training config: dataclasses are the source of truth; YAML and ``key=value`` map onto them.

    model: smollm2-135m-instruct        # HF dir | hub id | .gguf | built-in alias
    method: lora                        # a registered adapter method (lorakit.adapters.registry)
    lora: {r: 16, lora_alpha: 32, target_modules: all-linear}   # the method's config class
    data: {train: train.jsonl, eval: eval.jsonl, max_seq_len: 256}  # lorakit.data.DataConfig
    train: {epochs: 1, batch_size: 8, lr: 5.0e-4}                   # TrainArgs below
    output_dir: outputs/run

``load_config("run.yaml", ["train.lr=1e-3", "lora.r=8"])`` applies dotted overrides (values
parsed as YAML scalars, so ``lora.target_modules=[q_proj,v_proj]`` is a list) before the
dataclasses are built, so an override is validated exactly like the file. Unknown keys at any
level are errors naming the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit._dataclass_config import field_names, is_number, strict_config
from lorakit.errors import LorakitError, closest_hint, unknown_key_error

SCHEDULERS = ("linear", "cosine", "constant")
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")  # see lorakit.training.objectives
PRECISIONS = ("auto", "fp32", "bf16")  # see lorakit.hardware.resolve_precision


@strict_config
@dataclass
class TrainArgs:
    """Optimisation settings (the ``train.*`` keys).

    epochs: passes over the training set (ignored when max_steps > 0). max_steps: optimizer
    steps to run. batch_size: samples per micro-batch (per process); grad_accum: micro-batches
    per optimizer step. lr: peak AdamW learning rate, reached after warmup_ratio x total steps,
    then decayed by ``scheduler`` (linear | cosine to 0, or constant). max_grad_norm: global
    gradient clipping (0 = off). precision: auto (bf16 where this CPU's bf16 matmul is native and
    measured faster, else fp32; see lorakit.hardware), fp32, or bf16 = frozen base weights held in
    bf16 while adapter weights and optimizer state stay fp32. eval_every / save_every: steps between
    evaluations / checkpoints (0 = only at the end / never). resume: true continues from the
    latest checkpoint in output_dir/checkpoints (or a checkpoint directory path).
    loraplus_lr_ratio: LoRA+ (Hayou et al. 2024), lr of every lora_B = ratio x lr (None = off).
    logging_steps: steps between rows of metrics.jsonl. compile: true | false | auto, the decoder
    blocks through torch.compile (auto: on GPUs, not on CPUs, where it measured slower; see
    lorakit.training.compile). skip_estimate: start without ``lorakit estimate``'s check that the
    run fits in this host's memory (by default a run predicted not to fit is refused, with
    what to change). fsdp: under several processes, shard the frozen base with FSDP2 (each
    process holds 1/N of it; adapters replicated; lorakit.training.distributed).
    compact_memory: true | false | auto, glibc's allocator memory-first for the run (every
    allocation of 1 MiB or more a mapping of its own, unmapped when freed: a lower peak, but each
    step maps fresh pages; lorakit._memory.use_compact_allocation). auto: on for a quantized base
    (QLoRA), where memory is the point; measured on the built-in model (QLoRA, 4 x 256 tokens):
    2.21-2.26 GiB peak at 5.7-6.3 s per step on, 3.11-3.15 GiB at 4.7-5.3 s off; on a ~3B model it cost no
    step time and took the peak from 4.7 to 2.7 GiB.

    objective: sft (next-token loss on the responses) or a preference objective on preference
    rows (dpo, ipo, orpo, simpo) or KTO rows (kto); see lorakit.training.objectives. Their knobs
    carry TRL's names: beta (DPO/IPO/SimPO/KTO temperature; ORPO's λ, which TRL also calls
    beta), label_smoothing (conservative DPO / SimPO: the probability a preference is flipped),
    simpo_gamma (SimPO's target margin), cpo_alpha (weight of the NLL term on chosen answers added
    to SimPO, as TRL's CPOTrainer; default 0 = SimPO as published, TRL's default is 1),
    desirable_weight / undesirable_weight (KTO), precompute_ref_log_probs (reference log-probs
    computed once before training instead of a reference forward every step).
    """

    epochs: float = 1
    max_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    grad_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    seed: int = 42
    resume: bool | str = False
    loraplus_lr_ratio: float | None = None
    logging_steps: int = 1
    compile: bool | str = "auto"
    skip_estimate: bool = False
    fsdp: bool = False
    compact_memory: bool | str = "auto"
    objective: str = "sft"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_ref_log_probs: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise LorakitError(f"train.objective {self.objective!r} is unknown{closest_hint(str(self.objective), OBJECTIVES)}; "
                               f"valid choices: {', '.join(OBJECTIVES)}")
        _check_number(self, "beta", low=0.0, low_open=True)
        _check_number(self, "label_smoothing", low=0.0, high=0.49)
        _check_number(self, "simpo_gamma")
        for name in ("cpo_alpha", "desirable_weight", "undesirable_weight"):
            _check_number(self, name, low=0.0)
        if not isinstance(self.precompute_ref_log_probs, bool):
            raise LorakitError(f"train.precompute_ref_log_probs must be true or false, got {self.precompute_ref_log_probs!r}")
        if self.scheduler not in SCHEDULERS:
            raise LorakitError(f"train.scheduler {self.scheduler!r} is unknown{closest_hint(str(self.scheduler), SCHEDULERS)}; "
                               f"valid choices: {', '.join(SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            raise LorakitError(f"train.precision {self.precision!r} is unknown; valid choices: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            _check_int(self, name, minimum=1)
        for name in ("max_steps", "eval_every", "save_every", "seed"):
            _check_int(self, name, minimum=0)
        _check_number(self, "lr", low=0.0, low_open=True)
        _check_number(self, "epochs", low=0.0, low_open=True)
        _check_number(self, "warmup_ratio", low=0.0, high=1.0)
        _check_number(self, "weight_decay", low=0.0)
        _check_number(self, "max_grad_norm", low=0.0)
        for name in ("compile", "compact_memory"):
            value = getattr(self, name)
            if not (value is True or value is False or value == "auto"):
                raise LorakitError(f"train.{name} must be true, false or auto, got {value!r}")
        if self.loraplus_lr_ratio is not None:
            _check_number(self, "loraplus_lr_ratio", low=0.0, low_open=True)


def _check_int(obj, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LorakitError(f"train.{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(obj, name: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> None:
    value = getattr(obj, name)
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        bound += f" and <= {high}" if high is not None else ""
        raise LorakitError(f"train.{name} must be a finite number {bound}, got {value!r}")


def _default_lora_config():
    from lorakit.adapters import LoraConfig

    return LoraConfig()


def _default_data_config():
    from lorakit.data import DataConfig

    return DataConfig()


@strict_config
@dataclass
class TrainingConfig:
    """A whole training run. ``lora`` is an instance of the config class of ``method``
    (``get_method(method).config_class``); ``data`` is a ``lorakit.data.DataConfig``."""

    model: str = "smollm2-135m-instruct"
    method: str = "lora"
    lora: Any = field(default_factory=_default_lora_config)
    data: Any = field(default_factory=_default_data_config)
    train: TrainArgs = field(default_factory=TrainArgs)
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-serialisable) that ``TrainingConfig.from_dict`` reads back."""
        lora = self.lora.to_dict() if hasattr(self.lora, "to_dict") else dataclasses.asdict(self.lora)
        lora.pop("peft_type", None)
        return {"model": self.model, "method": self.method, "lora": lora,
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
                "output_dir": self.output_dir}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "config") -> "TrainingConfig":
        from lorakit.adapters import get_method
        from lorakit.data import DataConfig

        data = dict(data or {})
        names = field_names(cls)
        for key in data:
            if key not in names:
                raise unknown_key_error(key, names, where)
        method_name = data.get("method", "lora")
        method = get_method(method_name)
        sections = {}
        for key, section_cls in (("lora", method.config_class), ("data", DataConfig), ("train", TrainArgs)):
            value = data.get(key)
            if value is not None and not isinstance(value, dict):
                raise LorakitError(f"{where}: '{key}' must be a mapping of {section_cls.__name__} keys, got {value!r}")
            sections[key] = _build_section(section_cls, value or {}, f"{where} section '{key}'")
        top = {k: v for k, v in data.items() if k not in sections}
        for key in ("model", "output_dir"):
            if key in top and not isinstance(top[key], str):
                raise LorakitError(f"{where}: '{key}' must be a string, got {top[key]!r}")
        return cls(**top, **sections)


def _build_section(section_cls, values: dict, where: str):
    """Build one section dataclass; unknown keys name the section and the closest key."""
    if hasattr(section_cls, "from_dict"):
        return section_cls.from_dict(values, where=where)
    names = field_names(section_cls)
    for key in values:
        if key not in names:
            raise unknown_key_error(key, names, where)
    try:
        return section_cls(**values)
    except TypeError as err:  # e.g. a missing required field
        raise LorakitError(f"{where}: {err}") from None


# --- YAML and key=value overrides ----------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """"train.lr=1e-3" -> (["train", "lr"], 0.001); the value is parsed as a YAML scalar/flow."""
    import yaml

    if "=" not in text:
        raise LorakitError(f"override {text!r} must look like key=value (e.g. train.lr=1e-4)")
    key, _, raw = text.partition("=")
    path = key.strip().split(".")
    if not all(path):
        raise LorakitError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise LorakitError(f"override {text!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        value = _TOO_DEEP
    _check_yaml_shape(value, f"override {text!r}")
    return path, _yaml_number(value)


_MAX_DEPTH, _MAX_VALUES = 64, 100_000
_TOO_DEEP = object()  # what a YAML text nested past Python's recursion limit loads as


def _check_yaml_shape(value, where: str) -> None:
    """Refuse YAML nested deeper than _MAX_DEPTH or holding more than _MAX_VALUES values once its
    aliases are expanded: an alias inside itself (``a: &a [*a]``) never ends and nested aliases
    grow exponentially (the "billion laughs"), and every later step walks the expanded values."""
    stack, count = [(value, 0)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if node is _TOO_DEEP or depth > _MAX_DEPTH or count > _MAX_VALUES:
            raise LorakitError(f"{where}: nested deeper than {_MAX_DEPTH} levels or more than {_MAX_VALUES} values "
                               f"with YAML aliases expanded (an alias inside itself never ends); write it out plainly")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_number(value):
    """YAML 1.1 reads '1e-4' as a string (it wants '1.0e-4'); people mean the number."""
    if isinstance(value, str):
        return float(value) if _EXPONENT_NUMBER.fullmatch(value.strip()) else value
    if isinstance(value, dict):
        return {k: _yaml_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_number(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted ``key=value`` into a copy of the nested dict ``data``."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise LorakitError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LorakitError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        why = str(getattr(err, "problem", None) or err).splitlines()[0]
        raise LorakitError(f"{path}:{line} invalid YAML ({why})") from None
    except RecursionError:
        data = _TOO_DEEP
    _check_yaml_shape(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: a training config must be a mapping of keys, got {type(data).__name__}")
    return _yaml_number(data)


def _resolve_data_paths(config: TrainingConfig, base_dir: Path) -> None:
    """Relative data paths are taken from the working directory, or else next to the YAML file."""
    for key in ("train", "eval"):
        value = getattr(config.data, key, None)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base_dir / value).exists():
            setattr(config.data, key, str(base_dir / value))


def _raise_from_the_culprit(data: dict, overrides: list[str], where: str) -> None:
    """The merged config is invalid: raise the error of the file alone if it is invalid, else of
    the first override that makes it so, named as the override (not as a line of the file)."""
    TrainingConfig.from_dict(copy.deepcopy(data), where=where)
    for count, text in enumerate(overrides, start=1):
        TrainingConfig.from_dict(apply_overrides(data, overrides[:count]),
                                 where=f"command-line override {text!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """A validated TrainingConfig from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    try:
        config = TrainingConfig.from_dict(apply_overrides(data, overrides),
                                          where=str(path) if path else "config")
    except LorakitError:
        _raise_from_the_culprit(data, overrides, str(path) if path else "config")
        raise
    if path is not None:
        _resolve_data_paths(config, Path(path).resolve().parent)
    return config


def config_to_yaml(config: TrainingConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
