"""Continuous batching across adapters: rows join and leave a running batch at every step.

One ``step(joining)``:

    1. rows whose client is gone (``is_cancelled``) leave at once;
    2. one decode forward for the n running rows: input (n, 1) = each row's last token, at its
       own position; K, V written into the preallocated ``SlotKVCache``; each row through its
       own adapter (``MixedRows``: weights gathered once per row set, not per step);
    3. the joining requests are prefilled, several per forward (left-padded (J, P), up to
       PREFILL_TOKENS, each row through its own adapter; a long prompt alone), their
       transformers DynamicCache copied into cache rows n, n+1, ...;
    4. one sampling pass (``lorakit.inference.sampling``) over the (n + joined, V) logits;
    5. every row takes its token (text streamed, stop strings, EOS, length); finished rows
       leave, the last row moving into each freed cache row.

Rows are capped by ``max_rows`` and the cache by ``max_kv_bytes`` (``has_room`` tells a caller
whether more requests fit, counting each as prompt + max_new_tokens positions). A row's
logits equal that adapter alone, so greedy answers do not depend on what else runs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.inference.batched import GenerationRequest, RowState, cache_keyword, eos_token_ids
from lorakit.inference.kv_slots import SlotKVCache, attention_windows, kv_layout, prefill_mask
from lorakit.inference.mixed import MixedRows
from lorakit.inference.sampling import choose_tokens, new_generator

DEFAULT_MAX_KV_BYTES = 1 << 30
# Joining prompts are prefilled together, left-padded, up to this many (padded) tokens per
# forward: one pass over the weights for many short prompts; a longer prompt runs alone.
PREFILL_TOKENS = 2048


def reserved_positions(request: GenerationRequest) -> int:
    """Cache positions a request may fill: its prompt and every token it may generate."""
    return len(request.prompt_ids) + request.max_new_tokens


@dataclass
class _Running:
    state: RowState
    length: int  # positions written in the cache row
    reserved: int
    token: int | None = None  # the last sampled token, the next decode input


class ContinuousBatcher:
    """The running batch over ``multi`` (a MultiAdapterModel); see module docstring. Not
    thread-safe: one caller steps it (the server's worker thread, under the engine's lock)."""

    def __init__(self, multi, tokenizer, max_rows: int = 32, max_kv_bytes: int = DEFAULT_MAX_KV_BYTES):
        self.multi, self.tokenizer = multi, tokenizer
        self.model = multi.model
        self.device = next(self.model.parameters()).device
        self.max_rows, self.max_kv_bytes = max_rows, max_kv_bytes
        self.eos_ids = eos_token_ids(self.model, tokenizer)
        self.cache_arg = cache_keyword(self.model)
        self.windows = attention_windows(self.model.config)
        self.rows: list[_Running] = []
        self.cache: SlotKVCache | None = None
        self.steps = 0
        self._rows_version = 0  # bumped when the decoding rows change
        self._decode_mixed: tuple = (None, None)  # (key, MixedRows)

    @property
    def running(self) -> int:
        return len(self.rows)

    def new_row(self, request: GenerationRequest) -> RowState:
        return RowState(request, new_generator(request.temperature, request.seed, self.device))

    # --- admission ----------------------------------------------------------------------
    def kv_cache(self) -> SlotKVCache:
        """The cache, created with the layout of a one-token probe forward the first time."""
        if self.cache is None:
            from transformers import DynamicCache

            probe = DynamicCache(config=self.model.config)
            with torch.inference_mode(), self.multi.disable_adapter():
                self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=True,
                           logits_to_keep=1, **{self.cache_arg: probe})
            self.cache = SlotKVCache(kv_layout(probe), self.device, self.max_kv_bytes)
        return self.cache

    def has_room(self, joining: Sequence[GenerationRequest]) -> bool:
        """Whether ``joining`` fits beside the running rows: rows <= max_rows and the cache for
        (rows x longest reservation) within max_kv_bytes."""
        rows = len(self.rows) + len(joining)
        positions = max([r.reserved for r in self.rows] + [reserved_positions(q) for q in joining], default=0)
        return rows <= self.max_rows and self.kv_cache().fits(rows, positions)

    def fits_alone(self, request: GenerationRequest) -> bool:
        return self.kv_cache().fits(1, reserved_positions(request))

    # --- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, joining: Sequence[RowState] = ()) -> list[RowState]:
        """Decode the running rows, prefill ``joining``, sample, push; the rows that finished."""
        finished = self._leave([i for i, row in enumerate(self.rows) if _cancelled(row.state)], "cancelled")
        if not self.rows and not joining:
            return finished
        if not self.has_room([row.request for row in joining]):
            raise LorakitError(f"{len(joining)} joining rows do not fit beside {len(self.rows)} running ones "
                               f"(max_rows {self.max_rows}, KV cap {self.max_kv_bytes} bytes)")
        logits = [self._decode()] if self.rows else []
        logits += [self._prefill(group) for group in self._prefill_groups(joining)]
        logits = torch.cat(logits)  # (rows, V)
        states = [row.state for row in self.rows]
        tokens = choose_tokens(logits, [s.request.temperature for s in states], [s.request.top_p for s in states],
                               [s.generator for s in states])
        for row, token in zip(self.rows, tokens.tolist()):
            row.token = token
            row.state.push(token, self.tokenizer, self.eos_ids)
        self.steps += 1
        return finished + self._leave([i for i, row in enumerate(self.rows) if row.state.finish_reason], None)

    def reset(self) -> list[RowState]:
        """Drop every row (after a failed step); the states that were running."""
        states = [row.state for row in self.rows]
        self.rows = []
        self._rows_version += 1
        return states

    def _leave(self, indices: list[int], reason: str | None) -> list[RowState]:
        """Rows ``indices`` leave; the last row moves into each freed cache row."""
        left = []
        for i in sorted(indices, reverse=True):
            row, last = self.rows[i], len(self.rows) - 1
            if reason is not None:
                row.state.finish_reason = reason
            if i != last:
                self.cache.move(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            left.append(row.state)
        if indices:
            self._rows_version += 1
        return left[::-1]

    def _mixed(self, adapters: list[str | None], key=None):
        """The installed per-row adapters for a forward of rows using ``adapters`` (a no-op
        context when no adapter is loaded: the model is the base)."""
        stacks = self.multi.stacks()
        if stacks is None:
            return nullcontext()
        if key is None:
            return MixedRows(stacks, stacks.slot_ids(adapters)).installed()
        version, mixed = self._decode_mixed
        if mixed is None or mixed.stacks is not stacks or version != key:  # rows or adapters changed
            self._decode_mixed = (key, MixedRows(stacks, stacks.slot_ids(adapters)))
        return self._decode_mixed[1].installed()

    def _decode(self) -> torch.Tensor:
        """One token for every running row: (n, V) logits."""
        rows = self.rows
        lengths = torch.tensor([row.length for row in rows], device=self.device)  # (n,)
        tokens = torch.tensor([[row.token] for row in rows], device=self.device)  # (n, 1)
        mask = self.cache.begin_decode(lengths, self.windows)
        try:
            with self._mixed([row.state.request.adapter for row in rows], key=self._rows_version):
                out = self.model(input_ids=tokens, attention_mask=mask, position_ids=lengths[:, None],
                                 use_cache=True, **{self.cache_arg: self.cache})
        finally:
            self.cache.end_decode()
        for row in rows:
            row.length += 1
        return out.logits[:, -1]

    def _prefill_groups(self, joining: Sequence[RowState]) -> list[list[RowState]]:
        """``joining`` in arrival order, cut so that each group pads to at most PREFILL_TOKENS."""
        groups: list[list[RowState]] = []
        for state in joining:
            group = groups[-1] if groups else None
            longest = max([len(s.request.prompt_ids) for s in group or []] + [len(state.request.prompt_ids)])
            if group is not None and longest * (len(group) + 1) <= PREFILL_TOKENS:
                group.append(state)
            else:
                groups.append([state])
        return groups

    def _prefill(self, states: list[RowState]) -> torch.Tensor:
        """Run the prompts of ``states`` in one forward, left-padded to the longest P, each through
        its own adapter, and add them as the last rows: (J, V) logits of their last positions."""
        from transformers import DynamicCache

        prompts = [state.request.prompt_ids for state in states]
        width = max(len(prompt) for prompt in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)  # (J, P)
        positions = torch.zeros_like(ids)
        real = torch.zeros_like(ids, dtype=torch.bool)
        for j, prompt in enumerate(prompts):
            ids[j, width - len(prompt):] = torch.tensor(prompt, device=self.device)
            positions[j, width - len(prompt):] = torch.arange(len(prompt), device=self.device)
            real[j, width - len(prompt):] = True
        prefill = DynamicCache()  # every position kept: with the config, sliding layers keep only the last window
        mask = prefill_mask(real, self.windows, self.kv_cache().layout[0][2])
        with self._mixed([state.request.adapter for state in states]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: prefill})
        cache, first = self.kv_cache(), len(self.rows)
        reserved = [reserved_positions(state.request) for state in states]
        cache.ensure(first + len(states), max([r.reserved for r in self.rows] + reserved), live=first)
        for j, (state, prompt) in enumerate(zip(states, prompts)):
            cache.write_prompt(first + j, prefill, index=j, start=width - len(prompt))
            self.rows.append(_Running(state, len(prompt), reserved[j]))
        self._rows_version += 1
        return out.logits[:, -1]


def _cancelled(state: RowState) -> bool:
    return state.request.is_cancelled is not None and state.request.is_cancelled()
