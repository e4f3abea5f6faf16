"""README.md model card written next to the final adapter."""

from __future__ import annotations

from pathlib import Path

from lorakit._io import write_text_atomic


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_model_card(output_dir: str | Path, config, result, stats, trainable: int, total: int) -> Path:
    from lorakit.config import config_to_yaml

    lora = config.lora
    targets = lora.target_modules if getattr(lora, "target_modules", None) is not None else "model default"
    eval_line = (f"- final eval loss: {_fmt(result.eval_loss)} (perplexity {_fmt(result.eval_ppl)})"
                 if result.eval_loss is not None else "- final eval loss: n/a (no eval data)")
    initial_eval = (f"- eval loss before training: {_fmt(result.initial_eval_loss)}\n"
                    if result.initial_eval_loss is not None else "")
    if result.eval_metrics.get("rewards/accuracies") is not None:  # a preference objective
        eval_line += (f"\n- eval preference accuracy (rewards/accuracies): {_fmt(result.eval_metrics['rewards/accuracies'])}, "
                      f"margin {_fmt(result.eval_metrics.get('rewards/margins'))}")
    text = f"""---
base_model: {config.model}
library_name: peft
tags: [lorakit, {config.method}]
---

# {Path(output_dir).name}: a {config.method} adapter for `{config.model}`

Trained with lorakit. The files are in peft's layout (`adapter_config.json`,
`adapter_model.safetensors`), so peft and transformers load them directly.

## Use

```bash
lorakit generate --adapter {output_dir} "your prompt"
lorakit merge --adapter {output_dir} --output merged/
```

```python
from peft import PeftModel  # or: from lorakit import load_adapter
model = PeftModel.from_pretrained(base_model, "{output_dir}")
```

## Training

- base model: `{config.model}`
- objective: {config.train.objective}
- method: {config.method}, r = {getattr(lora, 'r', 'n/a')}, alpha = {getattr(lora, 'lora_alpha', 'n/a')}, targets: {targets}
- trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)
- train data: `{config.data.train}`; eval data: `{config.data.eval or (f'{config.data.eval_ratio:.0%} of train' if config.data.eval_ratio else 'none')}`
- {stats}
- steps: {result.global_step}, tokens seen: {result.tokens_seen:,}, time in training steps: {result.elapsed_s:.0f} s

## Results

- final train loss (mean of the last {result.final_loss_window} steps): {_fmt(result.train_loss)}
{initial_eval}{eval_line}

## Hyperparameters

```yaml
{config_to_yaml(config).rstrip()}
```
"""
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, text)
    return path
