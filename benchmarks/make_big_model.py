"""Write a Llama-architecture model of about 3B parameters with random bf16 weights, in shards.

    python benchmarks/make_big_model.py OUT_DIR [--shard-gb 1.0] [--tiny]

No download: the shapes are Llama-3.2-3B's (hidden 3072, MLP 8192, 28 layers, 24 query / 8 KV
heads of 128, vocabulary 128256, tied embedding), ~3.2B parameters, ~6.4 GB of bf16 safetensors
shards plus ``model.safetensors.index.json`` and ``config.json`` -- the layout of a hub checkpoint,
so ``from_pretrained`` and lorakit load it like one. The tokenizer is the built-in SmolLM2's (its
ids are all below the vocabulary size; the text it makes is what the benchmark trains on).

Memory: tensors are generated one at a time and written a shard at a time, so the writer holds
about one shard (``--shard-gb``), never the model. Weights are N(0, 0.02) like a fresh Llama
(norm weights 1), from a fixed seed. ``--tiny`` writes a 2-layer model of the same architecture
(a few MB, for smoke tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

LLAMA_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = dict(LLAMA_3B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=49152)


def _shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint: name -> shape, from the architecture on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # a tied head is not stored
        names[name] = tuple(tensor.shape)
    return names


def write_model(out: Path, fields: dict, shard_bytes: int, seed: int = 0) -> dict:
    """Write config, tokenizer, shards and index into ``out``; returns the index."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lorakit.models.load import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    shapes = _shapes(config)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map, total = {}, 0
    names = list(shapes)

    def flush(last: bool) -> None:
        index = len(shards)
        shard = shards[-1]
        name = f"model-{index:05d}-of-PLACEHOLDER.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key in shard:
            weight_map[key] = name
        shard.clear()
        if not last:
            shards.append({})

    for i, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shards[-1][name] = tensor
        size += tensor.numel() * 2
        total += tensor.numel() * 2
        if size >= shard_bytes or i == len(names) - 1:
            flush(last=i == len(names) - 1)
            size = 0
    count = len(shards)
    for old in sorted(set(weight_map.values())):  # the shard count is known only now
        new = old.replace("PLACEHOLDER", f"{count:05d}")
        (out / old).rename(out / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return index


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same architecture")
    args = parser.parse_args()
    index = write_model(args.out, TINY if args.tiny else LLAMA_3B, int(args.shard_gb * 1e9))
    params = index["metadata"]["total_size"] // 2
    print(f"wrote {params / 1e9:.2f}B parameters ({index['metadata']['total_size'] / 1e9:.2f} GB bf16) in "
          f"{len(set(index['weight_map'].values()))} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
