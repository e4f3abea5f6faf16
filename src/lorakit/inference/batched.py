"""Requests, results and per-row decoding state of batched generation across adapters.

Each request brings its prompt tokens, adapter (None: the base), sampling settings and stop
strings. ``generate_batch`` runs a list of them to the end with the continuous batcher that
also serves ``lorakit serve`` (``lorakit.inference.continuous``): each prompt prefilled alone,
then one decode step per token for all rows through the mixed-adapter path, so a batch over
many adapters costs about one base forward per token. Rows that finish (EOS, stop string,
max_new_tokens, cancelled) leave the batch and the KV cache at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


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
class RowState:
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


def cache_keyword(model) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def result_of(row: RowState) -> GenerationResult:
    return GenerationResult(row.text, row.tokens, row.finish_reason, len(row.request.prompt_ids))


def generate_batch(multi, tokenizer, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Generate for every request as one batch (all rows join at the first step); results in request order."""
    from lorakit.inference.continuous import ContinuousBatcher

    batcher = ContinuousBatcher(multi, tokenizer, max_rows=max(1, len(requests)))
    rows = [batcher.new_row(request) for request in requests]
    joining = rows
    while joining or batcher.running:
        batcher.step(joining)
        joining = []
    return [result_of(row) for row in rows]
