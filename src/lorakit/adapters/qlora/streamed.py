"""4-bit quantization of a matrix read a few rows at a time, equal to quantizing it whole.

bitsandbytes' ``quantize_4bit`` takes the whole dense matrix W (out, in) and, on a CPU, makes
temporaries of about its size: quantizing Llama-3.2-3B's 128256 x 3072 embedding table that way
holds 1.5 GiB of fp32 table and as much again in flight, more than the whole NF4 base.

NF4 / FP4 quantization is blockwise over the row-major values: block k (64 consecutive values)
gets one absmax a_k and 64 codes that depend on that block alone. So W can be quantized
``chunk_rows`` rows at a time (a multiple of 64 rows: every chunk holds whole blocks) and the
codes and absmax values concatenated in order. Double quantization then quantizes the whole
absmax vector a (one value per block, 1/64 of W's values) as bitsandbytes does:

    offset = mean(a);   (qa, state2) = quantize_blockwise(a - offset, blocksize=256)

giving the same codes, absmax values, offset and state as ``quantize_4bit(W)``, bit for bit
(tested). Peak memory: the growing codes (W's size / 8 for fp32) plus one chunk of dense rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from lorakit._quantized import _bnb

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights: what Linear4bit / Params4bit use
# Dense values quantized at once (32 MiB of fp32): rows per chunk = this / columns, rounded to 64.
CHUNK_VALUES = 8 * 2**20


def chunk_rows(columns: int, chunk_values: int | None = None) -> int:
    """Rows per chunk: a multiple of 64 (whole blocks whatever the width), about ``chunk_values``
    (default CHUNK_VALUES)."""
    values = CHUNK_VALUES if chunk_values is None else chunk_values
    return max(BLOCKSIZE, values // max(columns, 1) // BLOCKSIZE * BLOCKSIZE)


def quantize_4bit_by_rows(read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                          quant_type: str = "nf4", double_quant: bool = True, rows_per_chunk: int | None = None):
    """A bitsandbytes ``Params4bit`` holding W (rows, columns) = ``shape`` quantized, read through
    ``read_rows(start, stop)`` -> W[start:stop] (any float dtype, converted to ``dtype``, the dtype
    the quant state records and dequantization returns). Equal to ``Params4bit(W).to(device)``."""
    bnb = _bnb()
    functional = bnb.functional
    rows, columns = shape
    step = rows_per_chunk or chunk_rows(columns)
    codes, absmax = [], []
    device = None
    for start in range(0, rows, step):
        dense = read_rows(start, min(start + step, rows)).to(dtype).contiguous()  # (chunk, columns)
        device = dense.device
        chunk_codes, chunk_absmax = torch.ops.bitsandbytes.quantize_4bit.default(dense, BLOCKSIZE, quant_type,
                                                                                 torch.uint8)
        del dense
        codes.append(chunk_codes.reshape(-1))
        absmax.append(chunk_absmax)
    packed = torch.cat(codes).reshape(-1, 1)  # (rows·columns/2, 1) uint8, as quantize_4bit returns
    del codes
    absmax = torch.cat(absmax)  # (rows·columns/64,) fp32
    state = dict(shape=torch.Size(shape), dtype=dtype, blocksize=BLOCKSIZE,
                 code=functional.get_4bit_type(quant_type, device=device), quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        nested, state2 = functional.quantize_blockwise(absmax - offset, blocksize=256)
        quant_state = functional.QuantState(absmax=nested, offset=offset, state2=state2, **state)
    else:
        quant_state = functional.QuantState(absmax=absmax, **state)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=quant_state, blocksize=BLOCKSIZE,
                             compress_statistics=double_quant, quant_type=quant_type, quant_storage=torch.uint8,
                             bnb_quantized=True)


def is_prequantized(weight) -> bool:
    """Whether ``weight`` is already a quantized 4-bit parameter (made by ``quantize_4bit_by_rows``)."""
    return bool(getattr(weight, "bnb_quantized", False)) and getattr(weight, "quant_state", None) is not None
