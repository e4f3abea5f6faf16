"""Quickstart (``make demo``): fine-tune the built-in SmolLM2-135M-Instruct on a support dataset
for a fictional product, then show what changed.

1. trains with examples/quickstart.yaml (the same as ``lorakit train examples/quickstart.yaml``);
2. prints the eval loss on held-out support conversations before and after training (before =
   the base model: a fresh adapter has B = 0, so it does not change the output);
3. prints the base model's and the adapted model's answers to held-out questions side by side.

Extra ``key=value`` arguments override the config, e.g.
``python examples/quickstart.py train.epochs=1 output_dir=/tmp/qs``.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "quickstart.yaml"
QUESTIONS = HERE / "data" / "support_heldout_questions.json"
COLUMN = 44


def side_by_side(rows: list[tuple[str, str, str, str]]) -> str:
    """Question, expected, base and adapted answers: question on its own line, answers in columns."""
    lines = []
    for question, expected, base, adapted in rows:
        lines.append(f"Q: {question}")
        lines.append(f"   expected: {expected}")
        left = textwrap.wrap(base or "(empty)", COLUMN) or [""]
        right = textwrap.wrap(adapted or "(empty)", COLUMN) or [""]
        lines.append(f"   {'base model':<{COLUMN}} | adapted model")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"   {a:<{COLUMN}} | {b}")
        lines.append("")
    return "\n".join(lines)


def main(overrides: list[str]) -> int:
    import os

    os.chdir(HERE.parent)  # the config's data paths are relative to the repository root
    from lorakit.config import load_config
    from lorakit.inference.generate import GenerationSettings, generate, load_for_inference
    from lorakit.training import train

    started = time.perf_counter()
    config = load_config(CONFIG, overrides)
    print(f"== training {config.method} (r={config.lora.r}) on {config.model} with {config.data.train}")
    result = train(config)

    print("\n== answers to held-out questions (greedy decoding)")
    model, tokenizer = load_for_inference(adapter=result.output_dir)
    system = json.loads(Path(config.data.train).read_text().splitlines()[0])["messages"][0]["content"]
    settings = GenerationSettings(max_new_tokens=40)
    rows = []
    for item in json.loads(QUESTIONS.read_text()):
        adapted = generate(model, tokenizer, item["question"], settings, system=system)
        with model.disable_adapter():
            base = generate(model, tokenizer, item["question"], settings, system=system)
        rows.append((item["question"], item["answer"], base, adapted))
    print(side_by_side(rows))

    correct = sum(expected.rstrip(".") in adapted for _, expected, _, adapted in rows)
    print("== summary")
    print(f"eval loss on {config.data.eval} (response tokens): "
          f"before {result.initial_eval_loss:.4f} -> after {result.eval_loss:.4f} "
          f"(perplexity {2.718281828 ** result.initial_eval_loss:.2f} -> {result.eval_ppl:.2f})")
    print(f"held-out answers matching the expected text exactly: {correct}/{len(rows)}")
    print(f"training: {result.global_step} steps, {result.tokens_seen:,} tokens, {result.tokens_per_s:.0f} tokens/s; "
          f"total wall time {time.perf_counter() - started:.0f} s")
    print(f"adapter, model card, metrics.jsonl and loss.png in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
