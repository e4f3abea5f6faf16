"""A 4-bit input embedding, and the tied output head that shares its codes.

The table E (num_embeddings, dim) is quantized exactly like a linear weight (out, in): NF4 codes
in blocks of 64 consecutive values of the row-major table, one absmax per block (8-bit itself
with double quantization). When 64 divides ``dim`` every block lies inside one row, so a lookup
gathers the looked-up rows' codes and absmax values and dequantizes only those:

    embed(ids) = deq(Q(E))[ids]     # (..., dim), bit for bit the lookup in the dequantized table

(otherwise the whole table is dequantized per call). The model's output head, when tied to E,
becomes a bitsandbytes ``Linear4bit`` whose weight *is* this module's ``weight`` (one Params4bit,
one set of codes): logits = x · deq(Q(E))ᵀ, dequantized per forward and again in backward, as for
every 4-bit linear layer, so no dense copy of E is kept.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def block_absmax(state) -> torch.Tensor:
    """The fp32 absmax of every block, as ``bitsandbytes.functional.dequantize_4bit`` computes it
    (undoing double quantization), so that a row gather dequantizes bit for bit the same."""
    import bitsandbytes.functional as bnbF

    if not state.nested:
        return state.absmax.float()
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


class QuantizedEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table is a bitsandbytes ``Params4bit`` (NF4 / FP4).

    ``weight``: the quantized table (codes (num*dim/2, 1) uint8 with its ``quant_state``), possibly
    the same parameter as a tied ``Linear4bit`` output head. Returns the table's original dtype."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None = None):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.quant_state.shape
        self.padding_idx = padding_idx

    def extra_repr(self) -> str:
        state = self.weight.quant_state
        return f"{self.num_embeddings}, {self.embedding_dim}, quant_type={state.quant_type}, nested={state.nested}"

    def dequantized_table(self) -> torch.Tensor:
        """deq(Q(E)) (num_embeddings, dim) in the original dtype (a fresh tensor)."""
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(self.weight.data, self.weight.quant_state)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if self.embedding_dim % state.blocksize:  # a block spans two rows: no row gather
            return F.embedding(input_ids, self.dequantized_table(), self.padding_idx)
        rows = dequantize_rows(self.weight, input_ids.reshape(-1))  # (n, dim)
        return rows.view(*input_ids.shape, self.embedding_dim)


def dequantize_rows(weight, rows, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``rows`` (a slice or an index tensor) of the dequantized 4-bit matrix ``weight`` (a
    ``Params4bit`` of shape (num, dim) with 64 | dim, so every block lies inside one row), bit for
    bit those rows of ``dequantize_4bit(weight)``, reading only their codes: (n, dim) in the
    matrix's original dtype. ``absmax``: ``block_absmax(weight.quant_state)``, when the caller
    dequantizes many row sets of one matrix (it costs one pass over the absmax values)."""
    import bitsandbytes.functional as bnbF

    state = weight.quant_state
    num, dim = state.shape
    blocks = dim // state.blocksize
    absmax = (block_absmax(state) if absmax is None else absmax).view(num, blocks)[rows]  # (n, blocks) fp32
    codes = weight.data.view(num, dim // 2)[rows]  # (n, dim/2) uint8: two codes per byte
    rows_state = bnbF.QuantState(absmax=absmax.reshape(-1), shape=torch.Size((codes.shape[0], dim)),
                                 code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                                 dtype=state.dtype)
    return bnbF.dequantize_4bit(codes.reshape(-1, 1), rows_state)
