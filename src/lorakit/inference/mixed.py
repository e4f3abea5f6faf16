"""Mixed-adapter batches: every row of one forward uses its own LoRA adapter, or none.

Gathered batched LoRA, the S-LoRA / Punica idea (Sheng et al. 2023; Chen et al. 2023). For each
adapted layer the N loaded adapters are stacked once, zero-padded to the largest rank r_max,
with the scaling s_a folded into B and slot 0 the zero adapter (= base model):

    A_t: (N+1, in, r_max)      A_t[a] = A_a^T             (rows r_a..r_max are zero)
    B_t: (N+1, r_max, out)     B_t[a] = s_a · B_a^T

A batch whose row b uses slot ids[b] then adds, with one pair of matmuls per layer and no
Python loop over adapters (``_RowLora``: the adapters in use side by side, each row masked
to its own block),

    y_b = base(x_b) + (x_b @ A_t[ids[b]]) @ B_t[ids[b]]      x_b: (T, in) -> (T, r_max) -> (T, out)

The padded rank columns and the other adapters' masked columns contribute exact zeros, so a
row equals that row run alone with its adapter (up to float summation order). Inference only:
dropout is not applied.

Every adapter kind lorakit trains with LoRA layers mixes: LoRA, rsLoRA (another s), PiSSA
(converted to plain LoRA of rank 2r when saved), AdaLoRA (A = Λ ⊙ Q, B = P · α/(r₀+ε), its
kept rank), DoRA and ``modules_to_save``. DoRA (Liu et al. 2024) rescales the whole output,
y = b + g ⊙ (W x + s·B A x) with g = m / ||W + s·BA||_c, so its g is stacked too,

    G_t: (N+1, out)            G_t[a] = m_a / ||W + s_a B_a A_a||_c   (1 for non-DoRA slots)

computed once when the stacks are built (the base and adapters are frozen while serving),
never per step. A ``modules_to_save`` copy (a new lm_head, embeddings) runs on its own rows:
rows are grouped by the module their adapter chose. Refused with a clear message: adapters
that train biases (a shared base bias cannot differ per row), adapters merged into the base
weights, and methods that are not low-rank (bottleneck adapters, prefix tuning).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import nn

from lorakit.adapters.adalora.functional import svd_scale
from lorakit.adapters.adalora.layer import AdaLoraLayer
from lorakit.adapters.dora.layer import DORA, weight_norm
from lorakit.adapters.lora import LoraLayer
from lorakit.errors import LorakitError
from lorakit.models.modules_to_save import ModulesToSaveWrapper

BASE_SLOT = 0
_MIXABLE_TYPES = ("LORA", "ADALORA")


def _lora_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A (r, in), s·B (out, r), g (out,) or None) of a LoRA adapter: plain, rsLoRA (another s),
    PiSSA-converted (plain LoRA of rank 2r), DoRA (g = m / ||W + s·BA||_c, once, here)."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name]
    if layer.variants[name] is DORA:
        return A, B, (layer.lora_magnitude_vector[name].weight / weight_norm(layer, name)).detach()
    return A, B, None


def _adalora_factors(layer: AdaLoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, None]:
    """AdaLoRA's P (Λ ⊙ Q) · α/(r₀ + ε) as a rank-r LoRA: A = Λ ⊙ Q (r, in), B = P · α/(r₀ + ε).
    Its rank is what was kept after pruning (the loaded rank_pattern)."""
    return layer.lora_A[name] * layer.lora_E[name], layer.lora_B[name] * svd_scale(
        layer.scaling[name], layer.ranknum[name]), None


# The layer types a mixed batch can serve, each with how it writes an adapter as low-rank factors.
_FACTORS: dict[type, Callable] = {LoraLayer: _lora_factors, AdaLoraLayer: _adalora_factors}


def check_mixable(lora_model, names: Sequence[str]) -> None:
    """Raise a LorakitError naming the first adapter the mixed path cannot serve exactly."""
    for name in names:
        config = lora_model.peft_config.get(name)
        if config is None:
            raise LorakitError(f"unknown adapter '{name}'; loaded: {', '.join(lora_model.peft_config) or 'none'}")
        peft_type = getattr(config, "peft_type", "LORA")
        if peft_type not in _MIXABLE_TYPES:
            raise LorakitError(f"adapter '{name}' is {peft_type}; mixed-adapter batches serve LoRA-family and "
                               f"AdaLoRA adapters")
        if getattr(config, "bias", "none") != "none":
            raise LorakitError(f"adapter '{name}' trains biases (bias='{config.bias}'); a shared base bias cannot "
                               f"differ per row in a mixed-adapter batch")
    for module_name, layer in lora_model.adapter_layers():
        for name in names:
            if name in getattr(layer, "merged_adapters", ()):
                raise LorakitError(f"adapter '{name}' is merged into {module_name}; unmerge it before a mixed batch")
            if type(layer) not in _FACTORS and layer.has_adapter(name):
                raise LorakitError(f"adapter '{name}' adapts {module_name} with a {type(layer).__name__}; "
                                   f"mixed-adapter batches serve LoRA-family and AdaLoRA layers")


class LayerStack:
    """One adapted layer's adapters, stacked and zero-padded to r_max (module docstring):
    A_t (N+1, in, r_max), B_t (N+1, r_max, out), and for DoRA G_t (N+1, out) (1 where plain)."""

    def __init__(self, layer: nn.Module, names: Sequence[str], slots: dict[str, int]):
        factors = {n: _FACTORS[type(layer)](layer, n) for n in names if layer.has_adapter(n)}
        r_max = max(A.shape[0] for A, _, _ in factors.values())
        weight = next(iter(factors.values()))[0]
        self.layer = layer
        self.A_t = weight.new_zeros(len(names) + 1, layer.in_features, r_max)
        self.B_t = weight.new_zeros(len(names) + 1, r_max, layer.out_features)
        has_dora = any(g is not None for _, _, g in factors.values())
        self.G_t = weight.new_ones(len(names) + 1, layer.out_features) if has_dora else None
        for name, (A, B, g) in factors.items():
            slot, r = slots[name], A.shape[0]
            self.A_t[slot, :, :r] = A.T
            self.B_t[slot, :r, :] = B.T
            if g is not None:
                self.G_t[slot] = g
        bias = getattr(layer.base_layer, "bias", None)
        self.bias = bias.detach() if has_dora and bias is not None else None  # DoRA scales W x, not b


class WrapperStack:
    """One ``modules_to_save`` wrapper: module 0 the original, then each adapter's own copy;
    ``choice`` (N+1,) maps an adapter slot to the module its rows run through."""

    def __init__(self, wrapper: ModulesToSaveWrapper, names: Sequence[str], slots: dict[str, int]):
        self.wrapper = wrapper
        self.modules = [wrapper.original_module]
        self.choice = torch.zeros(len(names) + 1, dtype=torch.long)
        for name in names:
            if name in wrapper.modules_to_save:
                self.choice[slots[name]] = len(self.modules)
                self.modules.append(wrapper.modules_to_save[name])


class AdapterStacks:
    """The stacked adapters of ``names`` for every adapted layer and ``modules_to_save`` wrapper
    (see module docstring). Built once per adapter set (DoRA's g computed here, not per step) and
    reused for every batch; slot 0 is the base."""

    def __init__(self, lora_model, names: Sequence[str]):
        check_mixable(lora_model, names)
        self.names = list(names)
        self.slots = {name: i + 1 for i, name in enumerate(self.names)}
        with torch.no_grad():
            self.layers = [LayerStack(layer, self.names, self.slots) for _, layer in lora_model.adapter_layers()
                           if any(layer.has_adapter(n) for n in self.names)]
        self.wrappers = [WrapperStack(w, self.names, self.slots) for w in lora_model._wrappers()]

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
    """The per-row slot ids shared by every layer of one mixed batch. ``select`` keeps the rows
    still generating, ``set`` replaces them (rows joined or left a running batch); either bumps
    ``version``, so layers re-gather their rows' weights once, not at every step."""

    def __init__(self, ids: torch.Tensor):
        self.set(ids)
        self.version = 0

    def set(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.version = getattr(self, "version", -1) + 1
        self.any_adapter = bool((ids != BASE_SLOT).any())

    def select(self, keep: torch.Tensor) -> None:
        self.set(self.ids.index_select(0, keep.to(self.ids.device)))


def _row_ids_for(ids: torch.Tensor, batch: int) -> torch.Tensor:
    if batch != ids.shape[0]:
        if batch % ids.shape[0]:
            raise LorakitError(f"mixed batch has {ids.shape[0]} row adapters but the layer sees {batch} rows")
        ids = ids.repeat_interleave(batch // ids.shape[0])  # beams / num_return_sequences
    return ids


# Below this many rows per adapter in use, the side-by-side form costs more matmul work (B·U·r
# columns, U times the per-row form's) than it saves in memory reads, and each row gets its own
# gathered copy instead. Decoding on a CPU is bound by matmul work more than by reads: at 32 rows
# over 8 adapters of rank <= 16 on SmolLM2 (bf16 base, 2-core AVX-512 host) the per-row form
# stepped in 105.6 ms against 115.6 ms side by side.
_SIDE_BY_SIDE_MIN_ROWS_PER_ADAPTER = 8


class _RowLora:
    """The per-layer callable an adapter layer's forward delegates to inside ``mixed_adapters``.
    Prepared once per row set (never per step), in one of three exact forms:

    side by side, when the B rows use few adapters U (B >= 8 U): each adapter in use read once,

        A_u: (in, U·r)   B_u: (U·r, out)   M: (B, 1, U·r), 1 on the block of row b's adapter
        h = (x A_u) ⊙ M      (B, T, U·r): each row keeps its own adapter's r columns

    grouped, when fewer rows per adapter but some adapter on several rows: the S slots in use
    (the base's zero adapter included) each get a row of a grid of G places (G = most rows of one
    slot; a shorter slot repeats its first row there, computed and never read),

        X: (S, G·T, in) gathered rows   A_s: (S, in, r)   B_s: (S, r, out)
        h B = ((X A_s) B_s)[position of row b]     (B, T, out): each adapter read once, r columns

    per row, when every row has its own adapter: A: (B, in, r), B: (B, r, out) gathered, h = x A
    (B, T, r) by bmm. Then

        plain rows:  y = result + h B
        DoRA rows:   y = bias + g_b ⊙ (result - bias + h B)   (g = 1 for non-DoRA rows)

    A decode step reads the weights of a layer once; per-row copies of the same adapter would
    read it once per row (at 32 rows over 8 adapters of rank 16 on SmolLM2's q, k, v, up and down
    that is 4x the adapter bytes, ~0.8x the base weights, per step). Measured at 32 rows over 8
    adapters (bf16 base, 2-core AVX-512 host): per row 105.8 ms per decode step, grouped 95.5 ms."""

    def __init__(self, stack: LayerStack, rows: RowIds):
        self.stack, self.rows = stack, rows
        self._gathered: tuple = (None,) * 5  # (key, A, B, M or None, g (B, 1, out) or None)

    def _row_weights(self, batch: int) -> tuple:
        key = (self.rows.version, batch)
        if self._gathered[0] != key:
            ids, stack = _row_ids_for(self.rows.ids, batch), self.stack
            used = ids[ids != BASE_SLOT].unique()  # (U,) sorted
            g = stack.G_t.index_select(0, ids).unsqueeze(1) if stack.G_t is not None else None
            if used.numel() * _SIDE_BY_SIDE_MIN_ROWS_PER_ADAPTER > batch:
                slots = ids.unique()  # (S,) every slot in use, the base's zero adapter included
                if slots.numel() < batch:  # grouped: rows of one adapter side by side, each adapter read once
                    self._gathered = (key, stack.A_t.index_select(0, slots), stack.B_t.index_select(0, slots),
                                      _groups(ids, slots), g)
                else:  # per row: every row its own adapter
                    self._gathered = (key, stack.A_t.index_select(0, ids), stack.B_t.index_select(0, ids), None, g)
                return self._gathered[1:]
            in_features, r = stack.A_t.shape[1], stack.A_t.shape[2]
            A = stack.A_t.index_select(0, used).permute(1, 0, 2).reshape(in_features, -1)  # (in, U·r)
            B = stack.B_t.index_select(0, used).reshape(-1, stack.B_t.shape[2])  # (U·r, out)
            mask = None
            if used.numel() > 1 or bool((ids == BASE_SLOT).any()):
                block = (ids[:, None] == used[None, :]).to(A.dtype)  # (B, U)
                mask = block.repeat_interleave(r, dim=1)[:, None, :]  # (B, 1, U·r)
            self._gathered = (key, A, B, mask, g)
        return self._gathered[1:]

    def __call__(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.rows.any_adapter:
            return result
        batch = x.shape[0]
        A, B, mask, g = self._row_weights(batch)
        if isinstance(mask, _Groups):  # grouped: (S, G·T, in) -> (S, G·T, out) -> each row's (B, T, out)
            xs = x.reshape(batch, -1, x.shape[-1]).to(A.dtype)  # (B, T, in)
            grid = xs.index_select(0, mask.members).view(A.shape[0], -1, xs.shape[-1])  # (S, G·T, in)
            update = torch.bmm(torch.bmm(grid, A), B).view(-1, xs.shape[1], B.shape[2]).index_select(0, mask.position)
            return self._combine(result, g, lambda base: update if base is None else base + update)
        if A.dim() == 3:  # per row
            h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(A.dtype), A)  # (B, T, r)
        else:  # side by side
            h = (x.reshape(-1, x.shape[-1]).to(A.dtype) @ A).view(batch, -1, A.shape[1])  # (B, T, U·r)
            if mask is not None:
                h = h * mask
        return self._combine(result, g, lambda base: _product(h, B) if base is None else _add_product(base, h, B))

    def _combine(self, result: torch.Tensor, g: torch.Tensor | None, plus_update) -> torch.Tensor:
        """y from the base's ``result`` (module docstring's last lines); ``plus_update(base)``:
        base + h B (B, T, out) as a new tensor in the adapters' dtype, h B alone for None."""
        batch, out = result.shape[0], result.shape[-1]
        rows = result.reshape(batch, -1, out)  # (B, T, out)
        if g is None:
            if result.dtype == self.stack.B_t.dtype:
                return plus_update(rows).reshape(result.shape)
            return result + plus_update(None).reshape(result.shape).to(result.dtype)  # adapter dtype, then base's
        bias = self.stack.bias
        z = plus_update(rows.to(self.stack.B_t.dtype) if bias is None else rows.to(self.stack.B_t.dtype) - bias)
        y = z.mul_(g) if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
        return y.reshape(result.shape).to(result.dtype)


class _Groups:
    """The grouped form's row layout: ``members`` (S·G,) the row in each of S slots' G places
    (a slot with fewer rows repeats its first row; those places are computed and never read),
    ``position`` (B,) where row b's output lies in that (S·G) layout."""

    def __init__(self, members: torch.Tensor, position: torch.Tensor):
        self.members, self.position = members, position


def _groups(ids: torch.Tensor, slots: torch.Tensor) -> _Groups:
    rows = [torch.nonzero(ids == slot).flatten() for slot in slots]  # each slot's rows, in order
    width = max(len(r) for r in rows)
    members = torch.cat([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])  # (S·G,)
    position = torch.empty_like(ids)
    for s, r in enumerate(rows):
        position[r] = s * width + torch.arange(len(r), device=ids.device)
    return _Groups(members, position)


def _product(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """h @ B: h (B, T, k) with per-row B (B, k, out) or a shared B (k, out) -> (B, T, out)."""
    if B.dim() == 3:
        return torch.bmm(h, B)
    return (h.reshape(-1, h.shape[-1]) @ B).view(*h.shape[:-1], B.shape[-1])


def _add_product(base: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """base + h @ B in one op, a new tensor: h (B, T, k) with per-row B (B, k, out) or a shared
    B (k, out); base (B, T, out)."""
    if B.dim() == 3:
        return torch.baddbmm(base, h, B)
    return torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), B).view(base.shape)


class _RowModules:
    """The callable a ``modules_to_save`` wrapper delegates to inside ``mixed_adapters``: each row
    runs through its adapter's own copy of the module (or the original), grouped by module."""

    def __init__(self, stack: WrapperStack, rows: RowIds):
        self.stack, self.rows = stack, rows

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        choice = self.stack.choice.to(self.rows.ids.device)[_row_ids_for(self.rows.ids, x.shape[0])]  # (B,)
        used = choice.unique().tolist()
        if len(used) == 1:
            return self.stack.modules[used[0]](x, *args, **kwargs)
        out = None
        for k in used:
            index = (choice == k).nonzero().squeeze(1)
            part = self.stack.modules[k](x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out.index_copy_(0, index, part)
        return out


class MixedRows:
    """The per-row callables of one running batch, kept across forwards: a generation loop
    changes ``rows`` when rows join or leave, and installs the callables on the model only for
    its own forwards (``installed()``), so the model is a plain multi-adapter model in between
    and each layer gathers its rows' weights once per row set, not once per step."""

    def __init__(self, stacks: AdapterStacks, ids: torch.Tensor):
        self.stacks = stacks
        self.rows = RowIds(ids.to(stacks.layers[0].A_t.device) if stacks.layers else ids)
        self.hooks = [(s.layer, _RowLora(s, self.rows)) for s in stacks.layers]
        self.hooks += [(s.wrapper, _RowModules(s, self.rows)) for s in stacks.wrappers]

    @contextmanager
    def installed(self):
        modules = [module for module, _ in self.hooks]
        if any("mixed_batch" in module.__dict__ for module in modules):
            raise LorakitError("a mixed-adapter batch is already running on this model; run batches one at a time")
        try:
            for module, hook in self.hooks:
                module.mixed_batch = hook
            yield self.rows
        finally:
            for module in modules:
                module.__dict__.pop("mixed_batch", None)


@contextmanager
def mixed_adapters(stacks: AdapterStacks, row_adapters: Sequence[str | None] | torch.Tensor):
    """Inside this context every forward of the model uses row b's own adapter.

    ``row_adapters``: one adapter name (or None for the base) per batch row, or a tensor of
    slot ids. Yields the ``RowIds`` so a generation loop can change the rows it runs."""
    ids = row_adapters.long() if isinstance(row_adapters, torch.Tensor) else stacks.slot_ids(row_adapters)
    with MixedRows(stacks, ids).installed() as rows:
        yield rows
