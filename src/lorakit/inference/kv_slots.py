"""A preallocated KV cache for a batch whose rows come and go (continuous batching).

Per decoder layer l, keys and values live in two buffers

    K_l, V_l: (R, H_l, L, D_l)      R rows allocated, L positions per row, H_l KV heads of size D_l

Row b holds ``length[b]`` positions, always the first ones. The running rows are kept packed
in rows 0..n-1: a row that leaves is replaced by the last row (one copy of that row, once),
so a decode step reads the views K_l[:n, :, :used] with no per-step gather. R and L grow (one
copy) when a joining row needs more, never past ``max_bytes``:

    bytes(R, L) = R · L · Σ_l 2 · H_l · D_l · itemsize

During a decode step the cache is handed to the transformers model as its ``cache``: each
attention layer calls ``update(k, v, layer)`` with the new token's k, v: (n, H, 1, D); they are
written at each row's own position (rows have different lengths) and the attended views are
returned. The attention mask (built by ``begin_decode``) hides every position a row has not
written, so the rows never see each other's padding, and applies the model's sliding windows.
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError


class SlotKVCache:
    def __init__(self, layout: list[tuple[int, int, torch.dtype]], device, max_bytes: int):
        """``layout``: (KV heads, head size, dtype) of each decoder layer, in order."""
        self.layout = layout
        self.device = device
        self.max_bytes = max_bytes
        self.bytes_per_position = sum(2 * h * d * torch.empty((), dtype=t).element_size() for h, d, t in layout)
        self.rows, self.positions = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._decode: tuple | None = None  # (n, row index (n,), write position (n,), used) in a decode step

    def bytes_for(self, rows: int, positions: int) -> int:
        return rows * positions * self.bytes_per_position

    def fits(self, rows: int, positions: int) -> bool:
        return self.bytes_for(rows, positions) <= self.max_bytes

    def ensure(self, rows: int, positions: int, live: int) -> None:
        """Room for ``rows`` rows of ``positions`` each, keeping the first ``live`` rows. Grows by
        doubling where the budget allows (fewer copies), else exactly to what is asked."""
        if rows <= self.rows and positions <= self.positions:
            return
        if not self.fits(rows, positions):
            raise LorakitError(f"a KV cache of {rows} rows x {positions} positions needs "
                               f"{self.bytes_for(rows, positions) / 2**20:.0f} MiB; the cap is "
                               f"{self.max_bytes / 2**20:.0f} MiB")
        new_rows, new_positions = max(rows, self.rows), max(positions, self.positions)
        if rows > self.rows and self.fits(2 * new_rows, new_positions):
            new_rows = 2 * new_rows
        if positions > self.positions and self.fits(new_rows, 2 * new_positions):
            new_positions = 2 * new_positions
        keys, values = [], []
        for (heads, size, dtype), old_k, old_v in zip(self.layout, self.keys or [None] * len(self.layout),
                                                      self.values or [None] * len(self.layout)):
            k = torch.zeros(new_rows, heads, new_positions, size, dtype=dtype, device=self.device)
            v = torch.zeros_like(k)
            if old_k is not None and live:
                k[:live, :, :self.positions] = old_k[:live]
                v[:live, :, :self.positions] = old_v[:live]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.rows, self.positions = new_rows, new_positions

    def write_prompt(self, row: int, prefill_cache, index: int = 0, start: int = 0) -> None:
        """Copy row ``index`` of a prefill's cache (a transformers DynamicCache, (J, H, P, D) per
        layer), from position ``start`` on (after its left padding), into ``row``."""
        for layer, (k, v) in enumerate(_layer_states(prefill_cache)):
            p = k.shape[2] - start
            self.keys[layer][row, :, :p] = k[index, :, start:]
            self.values[layer][row, :, :p] = v[index, :, start:]

    def move(self, source: int, target: int, length: int) -> None:
        """Row ``source``'s first ``length`` positions become row ``target``'s (a row left)."""
        for k, v in zip(self.keys, self.values):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]

    # --- a decode step ------------------------------------------------------------------
    def begin_decode(self, lengths: torch.Tensor, windows: dict[str, int | None] | int | None = None):
        """Prepare one decode step for rows 0..n-1 with ``lengths`` (n,) positions written so far;
        returns the additive attention mask (n, 1, 1, used): 0 where a row may attend (its
        positions and the new token's, at position ``lengths``), the dtype's minimum elsewhere.
        ``windows`` (``attention_windows``): a sliding window for every layer (a query at position
        p sees only keys k > p - window, as transformers), or one per layer type (then a dict of
        masks, the form such models take)."""
        n = lengths.shape[0]
        used = int(lengths.max()) + 1
        self._decode = (n, torch.arange(n, device=self.device), lengths, used)
        if isinstance(windows, dict):
            return {kind: self._mask(lengths, used, window) for kind, window in windows.items()}
        return self._mask(lengths, used, windows)

    def _mask(self, lengths: torch.Tensor, used: int, window: int | None) -> torch.Tensor:
        dtype = self.layout[0][2]
        columns = torch.arange(used, device=self.device)[None, :]  # (1, used)
        visible = columns <= lengths[:, None]  # (n, used)
        if window is not None:
            visible &= columns > lengths[:, None] - window
        mask = torch.zeros(lengths.shape[0], 1, 1, used, dtype=dtype, device=self.device)
        return mask.masked_fill_(~visible[:, None, None, :], torch.finfo(dtype).min)

    def end_decode(self) -> None:
        self._decode = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' Cache.update: write the step's k, v (n, H, 1, D) at each row's position and
        return the attended keys and values (n, H, used, D)."""
        n, rows, positions, used = self._decode
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[rows, :, positions] = key_states[:, :, 0].to(k.dtype)
        v[rows, :, positions] = value_states[:, :, 0].to(v.dtype)
        return k[:n, :, :used], v[:n, :, :used]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._decode is None else self._decode[3] - 1


def prefill_mask(real: torch.Tensor, windows, dtype: torch.dtype):
    """Additive masks (J, 1, P, P) for left-padded prompts, ``real`` (J, P) True on each row's
    tokens: causal, no padded key, each model's sliding windows (a dict per layer type, as
    ``begin_decode``). A padded query sees itself only, so no row of the mask is empty (an empty
    row gives NaN, which would reach the real tokens through 0 x NaN)."""
    length = real.shape[1]
    query = torch.arange(length, device=real.device)[:, None]
    key = torch.arange(length, device=real.device)[None, :]

    def one(window):
        visible = (key <= query) & real[:, None, :]  # (J, P, P)
        if window is not None:
            visible &= key > query - window
        visible |= torch.eye(length, dtype=torch.bool, device=real.device)
        mask = torch.zeros(visible.shape, dtype=dtype, device=real.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]

    if isinstance(windows, dict):
        return {kind: one(window) for kind, window in windows.items()}
    return one(windows)


def attention_windows(config) -> dict[str, int | None] | int | None:
    """How the model's layers window their attention: None (every layer sees every earlier
    position), one ``sliding_window`` for all layers (Mistral: the config names a window and no
    per-layer types), or {layer type: window or None} when ``config.layer_types`` mixes
    "sliding_attention" layers in (Qwen2, Gemma 2/3: their forward takes a mask per type)."""
    types = getattr(config, "layer_types", None)
    if not types:
        return getattr(config, "sliding_window", None)
    if "sliding_attention" in types:
        return {kind: (config.sliding_window if kind == "sliding_attention" else None) for kind in set(types)}
    return None


def _layer_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_layout(prefill_cache) -> list[tuple[int, int, torch.dtype]]:
    """(KV heads, head size, dtype) per layer, read from a prefill's DynamicCache."""
    return [(k.shape[1], k.shape[3], k.dtype) for k, _ in _layer_states(prefill_cache)]
