"""Is an adapter directory sound? (``lorakit adapters check DIR [--base MODEL]``)

Every problem is one line; none means the adapter passes:

* files complete: adapter_config.json and adapter_model.safetensors (or a legacy .bin) exist
  and read (a truncated safetensors file fails here);
* config valid: the method's config accepts it (types, ranges, unknown keys), as every loader;
* tensors finite: one line per tensor holding NaN or Inf;
* shapes consistent: per adapted module, the tensors fit together and the config's rank (LoRA:
  A's rows == B's columns == r), through the method's ``delta_factors`` hook;
* with a base model: the adapter's base fingerprint matches it (an adapter without one, made by
  peft, is compared by base model name), and the adapter loads onto it (its target modules
  exist and have the shapes its tensors need).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from lorakit.errors import LorakitError


def _file_problems(directory: Path):
    """(problems, config dict or None, config object or None, tensors or None)."""
    from lorakit.models.peft_format import (CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, adapter_config_from_dict,
                                            read_adapter_config_dict, read_adapter_weights)

    problems, config_dict, config, tensors = [], None, None, None
    if not (directory / CONFIG_NAME).is_file():
        problems.append(f"{CONFIG_NAME} is missing")
    else:
        try:
            config_dict = read_adapter_config_dict(directory)
            config = adapter_config_from_dict(config_dict, directory)
        except LorakitError as err:
            problems.append(str(err))
    if not (directory / WEIGHTS_NAME).is_file() and not (directory / LEGACY_WEIGHTS_NAME).is_file():
        problems.append(f"{WEIGHTS_NAME} is missing")
    else:
        try:
            tensors = read_adapter_weights(directory, finite=False)
        except LorakitError as err:
            problems.append(str(err))
    return problems, config_dict, config, tensors


def _tensor_problems(directory: Path, config_dict: dict | None, config, tensors: dict) -> list[str]:
    """Non-finite tensors, then modules whose tensors do not fit together."""
    from lorakit.adapters import method_for_peft_type, parameter_tables
    from lorakit.inference.adapter_tools import module_tables
    from lorakit.models.peft_format import WEIGHTS_NAME, check_finite

    problems = []
    for key, tensor in tensors.items():
        try:
            check_finite({key: tensor}, str(directory / WEIGHTS_NAME))
        except LorakitError as err:
            problems.append(str(err))
    if config is None:
        return problems
    method = method_for_peft_type(config_dict["peft_type"])
    if method.delta_factors is not None:
        modules, _ = module_tables(tensors, parameter_tables())
        if not modules:
            problems.append(f"{directory / WEIGHTS_NAME}: holds no adapter tensors")
        for name, tables in sorted(modules.items()):
            try:
                method.delta_factors(config, name, tables)
            except LorakitError as err:
                problems.append(str(err))
    return problems


def _base_problems(directory: Path, config_dict: dict, base_model, base_name: str) -> list[str]:
    """Fingerprint (else name) against ``base_model``, then whether the adapter loads onto a copy of it."""
    from lorakit.inference.multi_adapter import normalized_model_name
    from lorakit.models.fingerprint import BaseMismatchWarning, adapter_base, require_same_base
    from lorakit.models.inject import load_adapter

    if adapter_base(directory) is not None:
        try:
            require_same_base(directory, base_model, hint="it is not an adapter for this base")
        except LorakitError as err:
            return [str(err)]
    else:
        recorded = config_dict.get("base_model_name_or_path")
        if recorded and normalized_model_name(recorded) != normalized_model_name(base_name):
            return [f"{directory}: no base fingerprint (not saved by lorakit) and its base model is '{recorded}', "
                    f"not '{base_name}'"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BaseMismatchWarning)
        try:
            load_adapter(copy.deepcopy(base_model), directory)  # a copy: loading wraps the model's layers
        except LorakitError as err:
            return [str(err)]
    return []


def check_adapter(directory: str | Path, base_model=None, base_name: str | None = None) -> list[str]:
    """The problems of the adapter in ``directory`` (one line each; [] when it is sound). With
    ``base_model`` (a loaded transformers model; ``base_name`` what it was loaded as) also
    whether it is an adapter for that base."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"'{directory}' is not a directory"]
    problems, config_dict, config, tensors = _file_problems(directory)
    if tensors is not None:
        problems += _tensor_problems(directory, config_dict, config, tensors)
    if base_model is not None and not problems:
        problems += _base_problems(directory, config_dict, base_model, base_name or "")
    # one line each, and each says where: messages of the readers name the file already
    return [" ".join((p if str(directory) in p else f"{directory}: {p}").split()) for p in problems]
