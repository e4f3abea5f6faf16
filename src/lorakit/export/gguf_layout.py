"""Where each weight of a Llama-family model goes in a GGUF file, and in what row order.

llama.cpp names tensors per block (``blk.{i}.attn_q.weight``) and keeps the model's shape
parameters under ``<arch>.*`` keys. Two things differ from the transformers checkpoint beyond
the names:

* **Row order of q and k (arch "llama").** transformers applies rotary embeddings to the two
  halves of each head (``rotate_half``: dimension j pairs with j + d/2); llama.cpp's "llama"
  rope pairs neighbours (2j with 2j + 1). The q and k projections' output rows are therefore
  reordered per head: GGUF row ``h·d + 2j + k`` holds transformers row ``h·d + k·d/2 + j``
  (h: head, d: head dim, j < d/2, k ∈ {0, 1}). Readers undo it (transformers' GGUF loader does).
  The "qwen2" architecture uses the half-split layout itself: no reordering.
* **Tied embeddings.** A tied ``lm_head`` is not written; readers tie ``output`` to
  ``token_embd`` when ``output.weight`` is absent.

Supported: LlamaForCausalLM and MistralForCausalLM (llama.cpp's "llama" architecture) and
Qwen2ForCausalLM ("qwen2"). Anything else is refused with one line before any work is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one transformers architecture is written: llama.cpp's name, and whether q/k rows are
    reordered to llama.cpp's interleaved rope layout."""
    name: str
    permute_qk: bool


ARCHITECTURES = {
    "LlamaForCausalLM": GGUFArchitecture("llama", permute_qk=True),
    "MistralForCausalLM": GGUFArchitecture("llama", permute_qk=True),
    "Qwen2ForCausalLM": GGUFArchitecture("qwen2", permute_qk=False),
}

# transformers name inside model.layers.{i}. -> llama.cpp name inside blk.{i}.
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def architecture_of(model) -> GGUFArchitecture:
    """The GGUF architecture of a transformers causal LM (its class, then its config's
    ``architectures``); one-line refusal for the others."""
    config = model.config
    names = [type(model).__name__] + list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            _check_rope(config)
            return ARCHITECTURES[name]
    raise LorakitError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this model is "
                       f"{names[0]} (convert it with llama.cpp's convert_hf_to_gguf.py)")


def _check_rope(config) -> None:
    """Rope scaling (Llama 3.1's 'llama3', YaRN, ...) needs extra GGUF keys and tensors that this
    writer does not produce: refuse rather than write a model that drifts on long inputs."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise LorakitError(f"GGUF export does not write rope scaling '{kind}' (convert this model with llama.cpp's "
                           f"convert_hf_to_gguf.py)")


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers parameter name (``model.layers.3.mlp.up_proj.weight``
    -> ``blk.3.ffn_up.weight``); LorakitError naming the tensor when it has no place in the file."""
    stem, _, kind = hf_name.rpartition(".")
    block = _BLOCK.match(stem)
    if block and block.group(2) in _BLOCK_NAMES:
        return f"blk.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}.{kind}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    raise LorakitError(f"tensor '{hf_name}' has no llama.cpp name (GGUF export knows the Llama/Mistral/Qwen2 layout)")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder output rows from transformers' half-split rope layout to llama.cpp's interleaved one.

    weight: (heads·d, ...) -> same shape; row ``h·d + 2j + k`` of the result is row
    ``h·d + k·d/2 + j`` of ``weight``. Works for weights (2-D), biases (1-D) and LoRA B factors."""
    d = weight.shape[0] // heads
    split = weight.reshape(heads, 2, d // 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


def rope_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``rope_permute`` (for reading a GGUF back)."""
    d = weight.shape[0] // heads
    pairs = weight.reshape(heads, d // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(pairs.swapaxes(1, 2).reshape(weight.shape))


def qk_heads(gguf_tensor_name: str, config) -> int | None:
    """Heads to reorder for a GGUF tensor: attention heads for attn_q, kv heads for attn_k, None
    for every other tensor."""
    if ".attn_q." in gguf_tensor_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_tensor_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_architecture_keys(writer, config, name: str) -> None:
    """``general.*`` and ``<arch>.*`` keys: what a reader needs to rebuild the model's config."""
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_dimension_count(int(head_dim(config)))
    writer.add_key_length(int(head_dim(config)))
    writer.add_value_length(int(head_dim(config)))
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return getattr(config, "rope_theta", 10000.0)
