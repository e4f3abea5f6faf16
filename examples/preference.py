"""Preference tuning example: DPO on the built-in SmolLM2-135M-Instruct with pairs built from
Python's own docstrings (examples/data/make_preference_data.py), then what changed.

1. trains with examples/preference.yaml (the same as ``lorakit train examples/preference.yaml``);
2. prints the preference accuracy on the held-out pairs before (the base model) and after:
   logps/accuracies = share of pairs whose chosen answer the model finds more likely than the
   rejected one, and the DPO reward accuracy / margin against the base model as reference;
3. prints the base model's and the adapted model's answers to two held-out prompts side by side.

Extra ``key=value`` arguments override the config, e.g.
``python examples/preference.py train.max_steps=2 output_dir=outputs/preference-smoke``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "preference.yaml"
sys.path.insert(0, str(HERE))


def _eval_rows(output_dir: Path) -> tuple[dict, dict]:
    """The first (step 0: the base model) and last evaluation rows of the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_loss" in row]
    return evals[0], evals[-1]


def main(overrides: list[str]) -> int:
    import os

    os.chdir(HERE.parent)  # the config's data paths are relative to the repository root
    from quickstart import side_by_side

    from lorakit.config import load_config
    from lorakit.inference.generate import GenerationSettings, generate, load_for_inference
    from lorakit.training import train

    started = time.perf_counter()
    config = load_config(CONFIG, overrides)
    print(f"== {config.train.objective} with {config.method} (r={config.lora.r}) on {config.model}, "
          f"pairs from {config.data.train}")
    result = train(config)
    before, after = _eval_rows(result.output_dir)

    print("\n== answers to held-out prompts (greedy decoding)")
    model, tokenizer = load_for_inference(adapter=result.output_dir)
    settings = GenerationSettings(max_new_tokens=40)
    rows = []
    for line in Path(config.data.eval).read_text().splitlines()[:2]:
        pair = json.loads(line)
        adapted = generate(model, tokenizer, pair["prompt"], settings)
        with model.disable_adapter():
            base = generate(model, tokenizer, pair["prompt"], settings)
        rows.append((pair["prompt"], pair["chosen"], base, adapted))
    print(side_by_side(rows))

    print("== summary")
    print(f"held-out pairs ({config.data.eval}): chosen answer more likely than rejected "
          f"{before['eval_logps/accuracies']:.1%} (base model) -> {after['eval_logps/accuracies']:.1%} (adapted)")
    print(f"DPO reward accuracy {after['eval_rewards/accuracies']:.1%}, margin {after['eval_rewards/margins']:.3f}, "
          f"eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    print(f"training: {result.global_step} steps, {result.tokens_seen:,} tokens, {result.tokens_per_s:.0f} tokens/s; "
          f"total wall time {time.perf_counter() - started:.0f} s")
    print(f"adapter, model card, metrics.jsonl and loss.png in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
