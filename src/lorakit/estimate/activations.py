"""Activation memory of one micro-batch, read from autograd itself on a model without weights.

The decoder of the meta model (``sizing.sizing_model``) runs forward on a fake (B, T) batch
under ``FakeTensorMode`` (every op computes shapes only) inside ``saved_tensors_hooks``: each
tensor autograd keeps for backward passes through the hook, so the sum of their storages
(each storage once, parameters excluded) is exactly what the real forward keeps, for this
architecture, this attention kernel, this method and these layers, with no formula per model.
Layers below the lowest adapted one keep nothing (their inputs need no gradient), as in a run.
Under fake tensors transformers cannot prove a batch unpadded, so it builds the explicit
(B, 1, T, T) mask (and expands grouped K/V heads) that a real padded batch, or a packed row of
several samples, gets: the trace sizes those batches, the common ones in training.

Gradient checkpointing keeps, per decoder layer, only its input (B, T, H) and recomputes one
layer during backward, so

    saved_ckpt = saved - Σ_layers saved_layer + n_grad_layers · B·T·H·bytes + max_layer saved_layer

The loss head is not traced (its boolean row selection is data-dependent): ``head_bytes``
sizes it from N labelled positions, vocabulary V and hidden size H (see that function).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.training.fused_loss import DEFAULT_CHUNK_ELEMENTS, _chunk_rows


@dataclass
class ActivationTrace:
    """Bytes autograd keeps for one forward of the decoder at (batch, seq): ``total``, of which
    ``per_layer[i]`` inside decoder layer i; ``grad_layers`` layers keep anything."""

    batch: int
    seq: int
    total: int = 0
    per_layer: list[int] = field(default_factory=list)
    hidden_bytes_per_token: int = 0     # H x the hidden states' element size (a checkpointed layer's input)

    @property
    def grad_layers(self) -> int:
        return sum(1 for b in self.per_layer if b > 0)

    @property
    def largest_layer(self) -> int:
        return max(self.per_layer, default=0)

    def with_checkpointing(self) -> int:
        """Bytes kept with gradient checkpointing (module docstring)."""
        inputs = self.grad_layers * self.batch * self.seq * self.hidden_bytes_per_token
        return self.total - sum(self.per_layer) + inputs + self.largest_layer


class _Kept:
    """A tensor autograd saved for backward, and the decoder layer that saved it (-1: none)."""

    __slots__ = ("tensor", "layer", "__weakref__")

    def __init__(self, tensor: torch.Tensor, layer: int):
        self.tensor, self.layer = tensor, layer


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList as long as config.num_hidden_layers
    (``model.layers`` for Llama-like models, ``transformer.h`` for GPT-2)."""
    count = getattr(lm.config, "num_hidden_layers", None) or getattr(lm.config, "n_layer", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"no list of {count} decoder layers in {type(lm).__name__}")


def trace_activations(adapted: nn.Module, batch: int, seq: int) -> ActivationTrace:
    """Trace the decoder of ``adapted`` (a meta model from ``sizing_model``) at (batch, seq).
    Its tensors become fake CPU tensors (still no memory); shapes and counts are unchanged."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    lm = adapted.model
    decoder = getattr(lm, lm.base_model_prefix)
    layers = decoder_layers(lm)
    trace = ActivationTrace(batch=batch, seq=seq, per_layer=[0] * len(layers))
    kept: weakref.WeakSet = weakref.WeakSet()   # what autograd still holds (a dead branch frees its own)
    current = [-1]

    def enter(index):
        return lambda *_: current.__setitem__(0, index)

    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda *_: current.__setitem__(0, -1)) for layer in layers]

    def pack(tensor):
        held = _Kept(tensor, current[0])
        kept.add(held)
        return held

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            # fake *CPU* tensors, not meta ones: SDPA picks its kernel by device, and on meta it
            # would take the math path (which keeps (B, heads, T, T) weights) instead of CPU flash
            adapted.to_empty(device="cpu")
            input_ids = torch.zeros(batch, seq, dtype=torch.long)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
                hidden = decoder(input_ids=input_ids, use_cache=False)[0]   # (B, T, H); keeps the graph alive
            parameters = {t.untyped_storage()._cdata for t in list(adapted.parameters()) + list(adapted.buffers())}
            saved = {}
            for held in list(kept):
                storage = held.tensor.untyped_storage()
                saved.setdefault(storage._cdata, (storage.nbytes(), held.layer))
    finally:
        for handle in handles:
            handle.remove()
    trace.hidden_bytes_per_token = hidden.shape[-1] * hidden.element_size()
    for storage, (size, layer) in saved.items():
        if storage in parameters:
            continue
        trace.total += size
        if layer >= 0:
            trace.per_layer[layer] += size
    return trace


def head_bytes(labelled: int, vocab: int, hidden: int, head_element: int, fused: bool,
               head_trains: bool = False, quantized: bool = False) -> int:
    """Bytes of the output head + loss over N = ``labelled`` positions at its peak (backward).

    fused (``training.fused_loss``, a plain Linear head): the (N, H) rows, their gradient
    ∂loss/∂h kept from forward, one (chunk, V) fp32 logits block, and ∂loss/∂W (V, H) fp32 when
    the head trains. quantized (``training.quantized_head_loss``, a 4-bit head the loop applies
    itself): the rows and their gradient, one (chunk, V) fp32 logits block, one dense (slice, H)
    fp32 slice of the head and the head's fp32 absmax values (V·H/64). Otherwise (a quantized or adapted head, or DDP's full forward): the (N, V)
    logits in the head's dtype, their fp32 copy and log-softmax kept for backward, and two more
    (N, V) fp32 tensors in backward (the gradient of log-softmax and of the logits)."""
    if fused:
        chunk = _chunk_rows(vocab, DEFAULT_CHUNK_ELEMENTS)
        size = 2 * labelled * hidden * head_element + min(chunk, max(labelled, 1)) * vocab * 4
        return size + (vocab * hidden * 4 if head_trains else 0)
    if quantized:
        from lorakit.training.quantized_head_loss import DEFAULT_LOGIT_ELEMENTS, DEFAULT_SLICE_ELEMENTS

        chunk = max(1, DEFAULT_LOGIT_ELEMENTS // max(vocab, 1))
        return (2 * labelled * hidden * head_element + min(chunk, max(labelled, 1)) * vocab * 4
                + DEFAULT_SLICE_ELEMENTS * 4 + vocab * hidden // 64 * 4)
    logits = labelled * vocab
    copies = 3 if head_element == 4 else 4     # an fp32 head needs no fp32 copy of its logits
    return logits * head_element + copies * logits * 4
