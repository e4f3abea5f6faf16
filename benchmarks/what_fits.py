"""What fits on a 16 / 24 / 64 GB machine: ``lorakit estimate`` for 1B, 3B and 8B Llama models.

    python benchmarks/what_fits.py [--seq 1024] [--batch 4]

No weights: each model is a directory holding only its config.json (the published shapes of
Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B) and the built-in model's tokenizer (the data's
token ids; the vocabulary size that matters is the config's). The data are plain text rows cut
to --seq tokens, so every micro-batch is --batch x --seq. Precision fp32 (the CPU default without
native bf16; bf16 halves the frozen weights), LoRA r=16 on all 7 linear layers, QLoRA the same
over NF4, full fine-tuning with AdamW. Prints a Markdown table: the predicted peak per process
and, per machine size, "fits" or the first suggestion that makes it fit. Runs in a minute or
two (the estimate builds every model on the meta device).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

MODELS = {  # name -> LlamaConfig fields (the published configs' shapes)
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
}
MACHINES_GB = (16, 24, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_dir(root: Path, name: str, tokenizer) -> Path:
    from transformers import LlamaConfig

    directory = root / name
    LlamaConfig(**MODELS[name], max_position_embeddings=8192, dtype="bfloat16").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _data(path: Path, rows: int, words: int) -> Path:
    rng = random.Random(0)
    words_list = ["model", "memory", "adapter", "layer", "token", "the", "of", "and", "to", "in"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words_list) for _ in range(words))}) + "\n"
                            for _ in range(rows)))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from lorakit.config import TrainingConfig
    from lorakit.estimate import estimate
    from lorakit.models.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    rows = [f"| model | method | peak per process | " + " | ".join(f"{gb} GB" for gb in MACHINES_GB) + " |",
            "|---|---|---|" + "---|" * len(MACHINES_GB)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _data(root / "data.jsonl", rows=4 * args.batch, words=2 * args.seq)
        for name in MODELS:
            model = _model_dir(root, name, tokenizer)
            for method in ("lora", "qlora", "full"):
                lora = {} if method == "full" else {"r": 16, "lora_alpha": 32, "target_modules": TARGETS}
                if method == "qlora":
                    lora["compute_dtype"] = "float32"
                config = TrainingConfig.from_dict({
                    "model": str(model), "method": method, "lora": lora,
                    "data": {"train": str(data), "format": "text", "max_seq_len": args.seq},
                    "train": {"batch_size": args.batch, "precision": "fp32", "max_steps": 10},
                    "output_dir": str(root / "out")})
                cells = []
                for gb in MACHINES_GB:
                    result = estimate(config, tokenizer=tokenizer, timing=False, available=gb * 10**9)
                    cells.append("fits" if result.fits else
                                 (f"try {result.suggestions[0]}" if result.suggestions else "no"))
                rows.append(f"| {name} | {method} | {result.peak / 2**30:.1f} GiB | " + " | ".join(cells) + " |")
                print(rows[-1], file=sys.stderr)
    print(f"batch {args.batch} x {args.seq} tokens, fp32 base (QLoRA: NF4, compute fp32), LoRA r=16 on all 7 "
          f"linear layers\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
