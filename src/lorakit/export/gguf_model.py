"""Write a (merged) Llama-family model as one GGUF file: f16, q8_0 or q4_0.

What each quantization does to a tensor (row length n, a multiple of 32 for the quantized ones):

    f16   every matrix in float16 (relative error about 2^-11 per weight)
    q8_0  matrices in blocks of 32: one fp16 scale s = max|w|/127 and 32 int8 q, w ≈ s·q
    q4_0  matrices in blocks of 32: scale s = max-magnitude/-8 and 4-bit q in [-8, 7]; the
          embedding and output matrices stay q8_0 (they are where 4 bits cost the most quality)

Vectors (norm weights, biases) stay float32 in every mode, as llama.cpp writes them, and a
matrix whose rows are not a multiple of 32 falls back to f16. The file is written next to its
target and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorakit._io import atomic_path
from lorakit.errors import LorakitError
from lorakit.export.gguf_layout import architecture_of, gguf_name, qk_heads, rope_permute, write_architecture_keys

QUANTS = ("f16", "q8_0", "q4_0")
_BLOCK = 32


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
            "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant]


def _tensor_kind(gguf_tensor: str, shape: tuple[int, ...], quant: str):
    """The GGML type one tensor is stored in (None: float32)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return None
    if quant == "f16" or shape[-1] % _BLOCK:
        return T.F16
    if quant == "q4_0" and gguf_tensor.split(".")[0] not in ("token_embd", "output"):
        return T.Q4_0
    return T.Q8_0


def encode_tensor(data: np.ndarray, kind) -> tuple[np.ndarray, object]:
    """(bytes or values to store, raw GGML type) for float32 ``data`` stored as ``kind``."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if kind is None:
        return data.astype(np.float32), T.F32
    if kind == T.F16:
        return data.astype(np.float16), T.F16
    return quantize(data.astype(np.float32), kind), kind


def write_gguf_model(model, tokenizer_meta, output: str | Path, quant: str = "f16", name: str = "lorakit") -> Path:
    """Write ``model`` (a transformers Llama/Mistral/Qwen2 causal LM with no adapters in it)
    and ``tokenizer_meta`` (a ``GGUFTokenizer``) to ``output``. Returns the path."""
    import gguf

    if quant not in QUANTS:
        raise LorakitError(f"--quant must be one of {', '.join(QUANTS)}, not '{quant}'")
    config = model.config
    arch = architecture_of(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    output = Path(output)
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        write_architecture_keys(writer, config, name)
        writer.add_file_type(_file_type(quant))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer_meta.write(writer)
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue  # readers tie output to token_embd when output.weight is absent
            target = gguf_name(hf_name)
            data = tensor.detach().to("cpu").float().numpy()
            heads = qk_heads(target, config) if arch.permute_qk else None
            if heads is not None:
                data = rope_permute(data, heads)
            values, raw = encode_tensor(data, _tensor_kind(target, data.shape, quant))
            writer.add_tensor(target, values, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return output
