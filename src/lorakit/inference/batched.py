"""Batched generation across adapters with a KV cache: the engine under the server.

Each request brings its prompt tokens, adapter (None: the base), sampling settings and stop
strings. Prompts are left-padded into one batch; one prefill and then one decode step per
token run the whole batch through the mixed-adapter path (``MultiAdapterModel.mixed``), so a
batch of rows over many adapters costs about one base forward per token. Rows that finish
(EOS, stop string, max_new_tokens, cancelled) leave the batch and the KV cache at once.

Sampling per row (greedy, or temperature and nucleus with the row's own seed) is
``lorakit.inference.sampling``: one pass for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lorakit.inference.sampling import choose_tokens, new_generator


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled"
    prompt_tokens: int


@dataclass
class _Row:
    """The decoding state of one request: its tokens and how much text was already sent."""

    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    text: str = ""
    finish_reason: str | None = None

    def push(self, token: int, tokenizer, eos_ids: set[int]) -> None:
        """Add one generated token; decide whether the row is finished; stream new text."""
        request = self.request
        if token in eos_ids and not request.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= request.max_new_tokens:
                self.finish_reason = "length"
        if request.is_cancelled is not None and request.is_cancelled():
            self.finish_reason = "cancelled"
        if self.finish_reason is None and not request.stop and request.on_text is None:
            return  # nothing reads the text before the row ends: decode once, at the end
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        hold = 0
        for stop in request.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at >= 0:
                text, self.finish_reason = text[:max(at, self.emitted)], "stop"
        if self.finish_reason is None:
            # hold back a possible stop-string prefix and an incomplete UTF-8 character
            hold = max((len(s) - 1 for s in request.stop), default=0)
            if text.endswith("\ufffd"):
                hold = max(hold, 1)
        self.text = text
        visible = max(self.emitted, len(text) - hold)
        if visible > self.emitted and request.on_text is not None:
            request.on_text(text[self.emitted:visible])
        self.emitted = max(self.emitted, visible)


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def _cache_keyword(model) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_batch(multi, tokenizer, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Generate for every request in one batch (see module docstring); results in request order."""
    from transformers import DynamicCache

    model = multi.model
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    rows = [_Row(r, new_generator(r.temperature, r.seed, device)) for r in requests]
    width = max(len(r.prompt_ids) for r in requests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(requests), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for b, request in enumerate(requests):  # left padding: the last column is every row's last token
        input_ids[b, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=device)
        mask[b, width - len(request.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_arg = _cache_keyword(model)
    active = list(range(len(rows)))
    with multi.mixed([r.adapter for r in requests]) as row_ids:
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_arg: cache}).logits[:, -1]  # (B, V)
        next_pos = positions[:, -1] + 1
        while True:
            chosen = [rows[i] for i in active]
            tokens = choose_tokens(logits, [r.request.temperature for r in chosen], [r.request.top_p for r in chosen],
                                   [r.generator for r in chosen])
            for i, token in zip(active, tokens.tolist()):
                rows[i].push(token, tokenizer, eos_ids)
            keep = [k for k, i in enumerate(active) if rows[i].finish_reason is None]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the KV cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                if row_ids is not None:
                    row_ids.select(index)
                active = [active[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           use_cache=True, **{cache_arg: cache}).logits[:, -1]
            next_pos = next_pos + 1
    return [GenerationResult(r.text, r.tokens, r.finish_reason, len(r.request.prompt_ids)) for r in rows]
