"""Which modules of a model get adapters: peft's matching rules, with errors that help.

Rules (same as peft): a list entry matches a module whose full name equals it or ends with
".<entry>"; a string is a regex that must match the full module name; "all-linear" selects
every Linear / Conv1D except the output head. ``exclude_modules`` uses the same rules.
``layers_to_transform`` keeps only modules whose first numbered path segment (or the one
after ``layers_pattern``) is in the list.
"""

from __future__ import annotations

import re

from torch import nn

from lorakit.adapters.lora.layer import SUPPORTED_BASE_TYPES
from lorakit._modules import name_matches
from lorakit.adapters import parameter_tables
from lorakit.errors import LorakitError

ALL_LINEAR = "all-linear"

# Default targets when a config gives none (peft's defaults for these architectures).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
}


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer block index in a module name ("model.layers.3.mlp.up_proj" -> 3)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(match.group(1)) if match else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (excluded by "all-linear", as in peft)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names | {"lm_head"}


def inside_adapter_wrapper(name: str) -> bool:
    """True for modules an adapter wrapper owns ("q_proj.base_layer", "q_proj.lora_A.x", ...):
    a second adapter must target the wrapper, never its insides."""
    tables = parameter_tables()
    return any(part in ("base_layer", "original_module", "modules_to_save") or part in tables
               for part in name.split("."))


def is_adaptable(module: nn.Module) -> bool:
    """A Linear / Conv1D, or an adapter wrapper around one (to add a second adapter)."""
    return isinstance(module, SUPPORTED_BASE_TYPES) or isinstance(getattr(module, "base_layer", None), nn.Module)


def linear_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_adaptable(m) and not inside_adapter_wrapper(n)]


def _short_names(names: list[str]) -> str:
    """Distinct last name segments, for an error message that lists what exists."""
    return ", ".join(sorted({n.split(".")[-1] for n in names}))


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise LorakitError(f"target_modules is not set and lorakit has no default for model type "
                           f"'{model_type}'; set target_modules (e.g. 'all-linear')")
    return DEFAULT_TARGETS[model_type]


def find_target_modules(model: nn.Module, config) -> list[str]:
    """Full names of the modules ``config`` selects, in model order; errors if none match."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    all_linear = targets == ALL_LINEAR or targets == [ALL_LINEAR]
    heads = output_head_names(model)
    keep = set(config.modules_to_save or [])
    selected, before_layer_filter = [], []
    for name, module in model.named_modules():
        if not name or inside_adapter_wrapper(name) or any(f".{k}." in f".{name}." for k in keep):
            continue
        if all_linear:
            if not is_adaptable(module) or name in heads:
                continue
        elif not name_matches(targets, name):
            continue
        if config.exclude_modules and name_matches(config.exclude_modules, name):
            continue
        before_layer_filter.append(name)
        if config.layers_to_transform is not None:
            if layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        selected.append(name)
    if not selected and before_layer_filter:  # the modules exist; the layer numbers do not
        found = sorted({layer_index(n, config.layers_pattern) for n in before_layer_filter} - {None})
        span = f"layers {found[0]} to {found[-1]}" if found else "no numbered layers"
        raise LorakitError(f"layers_to_transform {config.layers_to_transform!r} selects no layer: target_modules "
                           f"{targets!r} match modules in {span} of {type(model).__name__}")
    if not selected:
        raise LorakitError(f"target_modules {targets!r} matched no layer of {type(model).__name__}; "
                           f"its linear layers are: {_short_names(linear_layer_names(model))}")
    return selected
