"""A description of an adapter directory from its files alone (no base model loaded)."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


def adapter_info(directory: str | Path) -> dict:
    """{"method", "peft_type", "base_model", "base_fingerprint" (16 hex, recorded by lorakit; None
    for peft's files), "ranks", "lora_alpha", "targets", "adapted_modules", "trainable_params",
    "size_bytes" (adapter_model.safetensors + adapter_config.json), "extra"} read from
    adapter_config.json and adapter_model.safetensors. Both go through the checks every loader runs
    (config types and ranges, readable and finite tensors), so info accepts exactly what loads."""
    from lorakit.adapters import ADAPTER_METHODS, parameter_tables
    from lorakit.models.fingerprint import adapter_base
    from lorakit.models.peft_format import (WEIGHTS_NAME, adapter_config_from_dict, read_adapter_config_dict,
                                            read_adapter_weights)

    directory = Path(directory)
    config = read_adapter_config_dict(directory)
    adapter_config_from_dict(config, directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise LorakitError(f"'{directory}' has no {WEIGHTS_NAME}")
    shapes = {key: tuple(tensor.shape) for key, tensor in read_adapter_weights(directory).items()}
    ranks, modules, tables = set(), set(), parameter_tables()
    for key, shape in shapes.items():
        parts = key.split(".")
        table = next((i for i, part in enumerate(parts) if part in tables), None)
        if table is not None:  # an adapted module: the path before its adapter table
            modules.add(".".join(parts[:table]))
        if (".lora_A" in key or ".adapter_down.weight" in key) and len(shape) == 2:
            ranks.add(shape[0])  # LoRA's r; a bottleneck adapter's size m
    peft_type = config["peft_type"]
    methods = [m.name for m in ADAPTER_METHODS.values() if m.peft_type == peft_type]
    method = methods[0] if methods else peft_type.lower()
    if config.get("use_dora"):
        method = "dora" if "dora" in ADAPTER_METHODS else f"{method} (DoRA)"
    extra = {}
    for key in ("use_rslora", "init_lora_weights", "lora_dropout", "modules_to_save", "target_r", "init_r",
                "placement", "reduction_factor", "non_linearity", "adapter_dropout", "num_virtual_tokens",
                "prefix_projection"):
        if config.get(key) not in (None, False, [], {}, True) or (key == "use_rslora" and config.get(key)):
            extra[key] = config[key]
    if config.get("rank_pattern"):
        extra["rank_pattern"] = f"{len(config['rank_pattern'])} per-module ranks"
    size = weights.stat().st_size + (directory / "adapter_config.json").stat().st_size
    record = adapter_base(directory)
    return {
        "directory": str(directory),
        "method": method,
        "peft_type": peft_type,
        "base_model": config.get("base_model_name_or_path"),
        "base_fingerprint": record.fingerprint if record else None,
        "ranks": sorted(ranks) or ([config["r"]] if config.get("r") is not None else []),
        "lora_alpha": config.get("lora_alpha"),
        "targets": sorted({m.rsplit(".", 1)[-1] for m in modules}) or
                   ([str(config["target_modules"])] if config.get("target_modules") is not None else []),
        "adapted_modules": len(modules),
        "trainable_params": sum(_numel(shape) for shape in shapes.values()),
        "size_bytes": size,
        "extra": extra,
    }


def _numel(shape: tuple) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
