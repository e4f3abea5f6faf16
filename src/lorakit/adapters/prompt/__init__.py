"""The prompt baseline (``method: prompt``): no training at all; the base model sees k training
examples as earlier turns of the conversation (few-shot prompting), which is what "just prompt
it" means in the comparison with fine-tuning. ``lorakit train`` with this method evaluates the
base with that context and saves the chosen examples (``prompt_baseline.json``)."""

from lorakit.adapters.prompt.model import (PromptConfig, PromptModel, few_shot_turns, load_prompt,
                                           prompt_eval_context, wrap_prompt)

__all__ = ["PromptConfig", "PromptModel", "few_shot_turns", "load_prompt", "prompt_eval_context", "wrap_prompt"]
