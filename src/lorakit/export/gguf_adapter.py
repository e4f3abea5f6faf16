"""The adapter alone as a llama.cpp LoRA adapter GGUF (``llama-cli -m base.gguf --lora a.gguf``).

Layout (llama.cpp's): ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha = α``, the base's architecture, and per adapted linear two float32 tensors
named after the base tensor: ``blk.{i}.attn_q.weight.lora_a`` (r, in) and ``….lora_b`` (out, r).
llama.cpp applies ``W x + (α / r) · B (A x)`` with r read from each tensor pair.

Every method with a low-rank update (registry ``delta_factors``: LoRA and its variants, QLoRA,
AdaLoRA) gives per module ΔW = L R. The file stores A = R and B = L · r / α, so α / r · B A = ΔW
for every module whatever its own rank and alpha (rank_pattern, alpha_pattern, rsLoRA's
α / √r, AdaLoRA's pruned ranks). α is the config's effective ``lora_alpha`` (α·√r for rsLoRA),
so for a plain adapter B is stored exactly as trained. B's rows of q/k are reordered like the
base weights' (see gguf_layout). DoRA (a magnitude vector llama.cpp lacks), ``modules_to_save``
copies, bias training and embedding adapters are refused with one line: written without them
the file would silently compute something else.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lorakit._io import atomic_path
from lorakit.errors import LorakitError
from lorakit.export.gguf_layout import architecture_of, gguf_name, qk_heads, rope_permute


def adapter_low_rank_modules(adapter_dir: Path):
    """(config dict, config, {module path: (L, R)}) of a saved adapter; LorakitError when the
    adapter holds anything a llama.cpp LoRA adapter cannot express."""
    from lorakit.adapters import method_for_peft_type, parameter_tables
    from lorakit.inference.adapter_tools import module_tables
    from lorakit.models.peft_format import adapter_config_from_dict, read_adapter_config_dict, read_adapter_weights

    config_dict = read_adapter_config_dict(adapter_dir)
    config = adapter_config_from_dict(config_dict, adapter_dir)
    method = method_for_peft_type(config_dict["peft_type"])
    if method.delta_factors is None:
        raise LorakitError(f"{adapter_dir}: a {method.name} adapter has no low-rank update for a GGUF LoRA adapter; "
                           f"export the merged model (--format gguf)")
    if config_dict.get("use_dora"):
        raise LorakitError(f"{adapter_dir}: DoRA's magnitude vectors have no place in a llama.cpp LoRA adapter; "
                           f"export the merged model (--format gguf)")
    if config_dict.get("modules_to_save"):
        raise LorakitError(f"{adapter_dir}: modules_to_save ({', '.join(config_dict['modules_to_save'])}) are full "
                           f"copies a llama.cpp LoRA adapter cannot carry; export the merged model (--format gguf)")
    modules, rest = module_tables(read_adapter_weights(adapter_dir), parameter_tables())
    if rest:
        raise LorakitError(f"{adapter_dir}: tensor '{next(iter(rest))}' is not part of a low-rank update (trained "
                           f"biases?); export the merged model (--format gguf)")
    factors = {name: method.delta_factors(config, name, tables) for name, tables in sorted(modules.items())}
    return config_dict, factors


def effective_alpha(config_dict: dict, factors: dict) -> float:
    """α written to the file: lora_alpha (·√r for rsLoRA); the first module's rank if none."""
    alpha, r = config_dict.get("lora_alpha"), config_dict.get("r")
    if isinstance(alpha, (int, float)) and alpha > 0 and isinstance(r, int) and r > 0:
        return float(alpha) * (math.sqrt(r) if config_dict.get("use_rslora") else 1.0)
    return float(next(iter(factors.values()))[1].shape[0])


def write_gguf_adapter(adapter_dir: str | Path, base_model, output: str | Path) -> Path:
    """Write ``adapter_dir`` as a llama.cpp LoRA adapter GGUF for ``base_model`` (its
    architecture and head counts decide names and q/k row order). Returns the path."""
    import gguf

    adapter_dir = Path(adapter_dir)
    config_dict, factors = adapter_low_rank_modules(adapter_dir)
    arch = architecture_of(base_model)
    config = base_model.config
    alpha = effective_alpha(config_dict, factors)
    output = Path(output)
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_name(adapter_dir.name)
        for module, (left, right) in factors.items():
            target = gguf_name(module + ".weight")
            rank = right.shape[0]
            b = (left * (rank / alpha)).float().numpy()
            heads = qk_heads(target, config) if arch.permute_qk else None
            if heads is not None:
                b = rope_permute(b, heads)
            writer.add_tensor(f"{target}.lora_a", right.float().numpy())
            writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output
