"""Text generation with a base model and (optionally) one adapter: load, prompt, generate.

    model, tokenizer = load_for_inference(adapter="out/")        # base from adapter_config.json
    text = generate(model, tokenizer, [{"role": "user", "content": "Hi"}], stream=True)

Prompts for instruct models go through the tokenizer's chat template (lorakit.data's
``render_chat``, the same rendering training used, with its fallback template for tokenizers
without one). Greedy by default; ``temperature > 0`` samples (with ``top_p``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.inference.sampling import NucleusLogitsProcessor, is_greedy


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self, tokenizer) -> dict:
        """transformers ``generate`` arguments. Sampling follows ``lorakit.inference.sampling`` (the
        serving engine's rule: the same greedy threshold, temperature and nucleus), applied as a
        logits processor, so transformers only draws from the distribution it returns."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if is_greedy(self.temperature):
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                          logits_processor=[NucleusLogitsProcessor(self.temperature, self.top_p)])
        return kwargs


def adapter_base_model(adapter: str | Path) -> str:
    """The base model an adapter records (base_model_name_or_path in adapter_config.json)."""
    from lorakit.models.peft_format import CONFIG_NAME, read_adapter_config_dict

    base = read_adapter_config_dict(adapter).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise LorakitError(f"{Path(adapter) / CONFIG_NAME} records no base_model_name_or_path (a model name or "
                           f"path); pass --model")
    return base


def load_for_inference(adapter: str | Path | None = None, model: str | None = None, dtype="float32",
                       device: str = "cpu", check_base: bool = False):
    """(model in eval mode, tokenizer): ``model`` (default: the adapter's base) plus ``adapter``.
    An adapter recording another base model is loaded with a warning, or refused (LorakitError
    ending in "pass --force ...") with ``check_base``."""
    from lorakit.models.fingerprint import require_same_base
    from lorakit.models.inject import load_adapter
    from lorakit.models.load import DEFAULT_MODEL, load_model

    if model is None:
        model = adapter_base_model(adapter) if adapter else DEFAULT_MODEL
    base, tokenizer = load_model(model, dtype=dtype, device=device)
    if adapter is None:
        return base, tokenizer
    if check_base and Path(adapter).is_dir():
        require_same_base(adapter, base)
    return load_adapter(base, adapter).eval(), tokenizer


def is_chat_model(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, prompt: str | list[dict], system: str | None = None,
                 raw: bool = False) -> tuple[str, bool]:
    """(prompt text, whether it was rendered through a chat template). A string becomes one user
    turn (after ``system``) for a tokenizer with a chat template; ``raw=True``, or a tokenizer
    without one, sends the string verbatim. A message list always goes through ``render_chat``
    (its fallback template for tokenizers without one: what training used)."""
    from lorakit.data import render_chat

    if isinstance(prompt, str):
        if raw or not is_chat_model(tokenizer):
            return prompt, False
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        messages = prompt
    return render_chat(tokenizer, messages, add_generation_prompt=True), True


@torch.no_grad()
def _room_for_new_tokens(model, prompt_tokens: int, max_new_tokens: int) -> int:
    """max_new_tokens, capped at what the model's context has left after the prompt. A prompt the
    context cannot hold is refused before any work (it ran for minutes and printed nothing)."""
    from lorakit.errors import LorakitError

    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context:
        return max_new_tokens
    if prompt_tokens >= context:
        raise LorakitError(f"the prompt has {prompt_tokens} tokens and the model's context holds {context}; "
                           f"shorten the prompt")
    return min(max_new_tokens, context - prompt_tokens)


def generate(model, tokenizer, prompt: str | list[dict], settings: GenerationSettings | None = None,
             system: str | None = None, raw: bool = False, stream: bool = False) -> str:
    """The model's reply to ``prompt`` (only the new text). ``stream=True`` also prints tokens to
    stdout as they are produced (transformers' TextStreamer)."""
    settings = settings or GenerationSettings()
    text, templated = build_prompt(tokenizer, prompt, system, raw)
    # A rendered template already contains its special tokens (e.g. BOS); do not add them twice.
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    kwargs = settings.generate_kwargs(tokenizer)
    kwargs["max_new_tokens"] = _room_for_new_tokens(model, encoded["input_ids"].shape[1], settings.max_new_tokens)
    device = next(model.parameters()).device
    input_ids = encoded["input_ids"].to(device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    output = model.generate(input_ids=input_ids, attention_mask=encoded["attention_mask"].to(device),
                            streamer=streamer, **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
