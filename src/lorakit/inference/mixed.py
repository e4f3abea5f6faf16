"""Mixed-adapter batches: every row of one forward uses its own LoRA adapter, or none.

Gathered batched LoRA, the S-LoRA / Punica idea (Sheng et al. 2023; Chen et al. 2023). For each
adapted layer the N loaded adapters are stacked once, zero-padded to the largest rank r_max,
with the scaling s_a folded into B and slot 0 the zero adapter (= base model):

    A_t: (N+1, in, r_max)      A_t[a] = A_a^T             (rows r_a..r_max are zero)
    B_t: (N+1, r_max, out)     B_t[a] = s_a · B_a^T

A batch whose row b uses slot ids[b] then adds, with one pair of batched matmuls per layer
and no Python loop over adapters,

    y_b = base(x_b) + (x_b @ A_t[ids[b]]) @ B_t[ids[b]]      x_b: (T, in) -> (T, r_max) -> (T, out)

The padded rank columns contribute exact zeros, so a row equals that row run alone with its
adapter (up to float summation order). Inference only: dropout is not applied.

Refused with a clear message (never silently wrong): DoRA adapters (their magnitude
normalisation is not a low-rank update), adapters with ``modules_to_save`` or trained biases
(not per-row), and adapters merged into the base weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.lora.variants import PLAIN
from lorakit.errors import LorakitError

BASE_SLOT = 0


def check_mixable(lora_model, names: Sequence[str]) -> None:
    """Raise a LorakitError naming the first adapter the mixed path cannot serve exactly."""
    for name in names:
        config = lora_model.peft_config.get(name)
        if config is None:
            raise LorakitError(f"unknown adapter '{name}'; loaded: {', '.join(lora_model.peft_config) or 'none'}")
        if getattr(config, "peft_type", "LORA") != "LORA":
            raise LorakitError(f"adapter '{name}' is {config.peft_type}; mixed-adapter batches support plain LoRA only")
        if getattr(config, "use_dora", False):
            raise LorakitError(f"adapter '{name}' is a DoRA adapter; mixed-adapter batches support plain LoRA "
                               f"only (merge it, or serve it on its own with set_adapter)")
        if config.modules_to_save:
            raise LorakitError(f"adapter '{name}' has modules_to_save {config.modules_to_save}; these whole-module "
                               f"copies cannot differ per row in a mixed-adapter batch")
        if getattr(config, "bias", "none") != "none":
            raise LorakitError(f"adapter '{name}' trains biases (bias='{config.bias}'); a shared base bias cannot "
                               f"differ per row in a mixed-adapter batch")
    for module_name, layer in lora_model.adapter_layers():
        for name in names:
            if name in layer.merged_adapters:
                raise LorakitError(f"adapter '{name}' is merged into {module_name}; unmerge it before a mixed batch")
            if layer.has_adapter(name) and not (isinstance(layer, LoraLayer) and layer.variants[name] is PLAIN):
                raise LorakitError(f"adapter '{name}' is not a plain LoRA adapter in {module_name} (DoRA or another "
                                   f"variant); mixed-adapter batches support plain LoRA only")


class AdapterStacks:
    """The stacked, zero-padded A and B of ``names`` for every adapted layer (see module
    docstring). Build once per adapter set and reuse for every batch; slot 0 is the base."""

    def __init__(self, lora_model, names: Sequence[str]):
        check_mixable(lora_model, names)
        self.names = list(names)
        self.slots = {name: i + 1 for i, name in enumerate(self.names)}
        self.layers = []  # (layer, A_t (N+1, in, r_max), B_t (N+1, r_max, out))
        with torch.no_grad():
            for _, layer in lora_model.adapter_layers():
                present = [n for n in self.names if n in layer.lora_A]
                if not present:
                    continue
                r_max = max(layer.r[n] for n in present)
                weight = layer.lora_A[present[0]].weight
                slots = len(self.names) + 1
                A_t = weight.new_zeros(slots, layer.in_features, r_max)
                B_t = weight.new_zeros(slots, r_max, layer.out_features)
                for name in present:
                    slot, r = self.slots[name], layer.r[name]
                    A_t[slot, :, :r] = layer.lora_A[name].weight.T
                    B_t[slot, :r, :] = layer.lora_B[name].weight.T * layer.scaling[name]
                self.layers.append((layer, A_t, B_t))

    def slot_ids(self, row_adapters: Sequence[str | None], device=None) -> torch.Tensor:
        """(B,) slot index per row: None, "" or -1 -> base (slot 0)."""
        ids = []
        for name in row_adapters:
            if name is None or name == "" or name == -1:
                ids.append(BASE_SLOT)
            elif name in self.slots:
                ids.append(self.slots[name])
            else:
                raise LorakitError(f"row adapter '{name}' is not loaded; loaded: {', '.join(self.names) or 'none'}")
        return torch.tensor(ids, dtype=torch.long, device=device)


class RowIds:
    """The per-row slot ids shared by every layer of one mixed batch; ``select`` keeps the rows
    that are still generating (after the KV cache drops finished rows)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self.version = 0  # bumped when the rows change, so layers re-gather their weights
        self.any_adapter = bool((ids != BASE_SLOT).any())

    def select(self, keep: torch.Tensor) -> None:
        self.ids = self.ids.index_select(0, keep.to(self.ids.device))
        self.version += 1
        self.any_adapter = bool((self.ids != BASE_SLOT).any())


class _RowLora:
    """The per-layer callable LoraLayer.forward delegates to inside ``mixed_adapters``.

    The rows' A and B are gathered once per row set and reused by every decoding step (a
    decode step is tiny, so per-step gathers and extra ops would cost more than the matmuls)."""

    def __init__(self, A_t: torch.Tensor, B_t: torch.Tensor, rows: RowIds):
        self.A_t, self.B_t, self.rows = A_t, B_t, rows
        self._gathered: tuple = (None, None, None)  # (key, A (B, in, r), B (B, r, out))

    def _row_weights(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.rows.version, batch)
        if self._gathered[0] != key:
            ids = self.rows.ids
            if batch != ids.shape[0]:
                if batch % ids.shape[0]:
                    raise LorakitError(f"mixed batch has {ids.shape[0]} row adapters but the layer sees {batch} rows")
                ids = ids.repeat_interleave(batch // ids.shape[0])  # beams / num_return_sequences
            self._gathered = (key, self.A_t.index_select(0, ids), self.B_t.index_select(0, ids))
        return self._gathered[1], self._gathered[2]

    def __call__(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.rows.any_adapter:
            return result
        batch = x.shape[0]
        A, B = self._row_weights(batch)
        h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(A.dtype), A)  # (B, T, r)
        if result.dtype == B.dtype and result.is_contiguous():
            # result + h @ B in one op: (B, T, out)
            return torch.baddbmm(result.reshape(batch, -1, result.shape[-1]), h, B).reshape(result.shape)
        return result + torch.bmm(h, B).reshape(result.shape).to(result.dtype)


@contextmanager
def mixed_adapters(stacks: AdapterStacks, row_adapters: Sequence[str | None] | torch.Tensor):
    """Inside this context every forward of the model uses row b's own adapter.

    ``row_adapters``: one adapter name (or None for the base) per batch row, or a tensor of
    slot ids. Yields the ``RowIds`` so a generation loop can drop finished rows."""
    if isinstance(row_adapters, torch.Tensor):
        ids = row_adapters.long()
    else:
        ids = stacks.slot_ids(row_adapters)
    layers = [layer for layer, _, _ in stacks.layers]
    busy = [layer for layer in layers if "mixed_batch" in layer.__dict__]
    if busy:
        raise LorakitError("a mixed-adapter batch is already running on this model; run batches one at a time")
    rows = RowIds(ids.to(stacks.layers[0][1].device) if stacks.layers else ids)
    try:
        for layer, A_t, B_t in stacks.layers:
            layer.mixed_batch = _RowLora(A_t, B_t, rows)
        yield rows
    finally:
        for layer in layers:
            layer.__dict__.pop("mixed_batch", None)
