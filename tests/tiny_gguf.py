"""A tiny GGUF model written with the ``gguf`` package (no download): a 1-layer Llama, hidden
size 16, a 277-token SentencePiece vocabulary (byte tokens and a few words). transformers'
GGUF support reads it in a fraction of a second; the keyword arguments of ``write_gguf`` make
it inconsistent on purpose (for the tests of what ``load_model`` refuses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["a", "b", "c", "ab", "bc", "hello", "world", "the", "cat"]


def write_gguf(path: Path, arch: str = "llama", hidden: int = 16, layers: int = 1, heads: int = 2, kv_heads: int = 1,
               ff: int = 32, vocab_extra: int = 0, drop: frozenset = frozenset(), tokenizer: bool = True,
               block_count: int | None = None, dtype=np.float32, shape_lie: str | None = None) -> Path:
    """A tiny GGUF model; the keyword arguments make it inconsistent on purpose."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁" + w for w in WORDS] + WORDS
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers if block_count is None else block_count)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(max(hidden // max(heads, 1), 1))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab + vocab_extra)
    if tokenizer:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    head_dim = hidden // max(heads, 1)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (head_dim * kv_heads, hidden),
                       f"blk.{i}.attn_v.weight": (head_dim * kv_heads, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ff)})
    for name, shape in shapes.items():
        if name in drop:
            continue
        if shape_lie == name:
            shape = tuple(s + 1 for s in shape)
        data = np.ones(shape, np.float32) if name.endswith("norm.weight") else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, data.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
