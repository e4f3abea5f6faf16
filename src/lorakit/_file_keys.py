"""peft's adapter file names (a leaf module: adapters and models both map names through it).

In memory an adapter parameter carries its adapter's name after the table that holds it
(``q_proj.lora_A.default.weight``) and wrapper infixes (``base_layer``, ``modules_to_save.<name>``);
in the file both are dropped and ``base_model.model.`` is prepended, as peft does. Which path
components are adapter tables (``lora_A``, ``lora_E``, ``lora_magnitude_vector`` ...) is declared by
each method in the registry (``AdapterMethod.parameter_tables``) and passed in here.
"""

from __future__ import annotations

FILE_PREFIX = "base_model.model."
WRAPPER_INFIXES = ("base_layer", "original_module")
# peft stores these adapter tensors without the trailing ".weight".
BARE_TENSORS = frozenset({"lora_magnitude_vector"})


def file_key(model_key: str, adapter_name: str, tables) -> str | None:
    """Map an in-memory parameter name of the wrapped model to peft's file name, or None when the
    parameter does not belong to ``adapter_name``. ``tables``: the adapter table names.

    "model.layers.0.self_attn.q_proj.lora_A.default.weight" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    "lm_head.modules_to_save.default.weight" -> "base_model.model.lm_head.weight"
    """
    parts = model_key.split(".")
    out = []
    i = 0
    owned = False
    while i < len(parts):
        part = parts[i]
        if part == "modules_to_save" and i + 1 < len(parts):
            if parts[i + 1] != adapter_name:
                return None
            owned, i = True, i + 2
            continue
        if part in tables and i + 1 < len(parts) and not parts[i + 1].isdigit():
            if parts[i + 1] != adapter_name:
                return None
            owned = True
            out.append(part)
            i += 2
            if part in BARE_TENSORS and i < len(parts) and parts[i] == "weight":
                i += 1
            continue
        if part in WRAPPER_INFIXES:
            i += 1
            continue
        out.append(part)
        i += 1
    return FILE_PREFIX + ".".join(out) if owned else None
