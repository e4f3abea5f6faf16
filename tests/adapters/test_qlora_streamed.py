"""4-bit quantization by rows (``lorakit.adapters.qlora.streamed``) equals bitsandbytes
quantizing the whole matrix: the same codes, absmax values, offset and nested state, bit for bit,
whatever the chunking (several chunks, a last short one, widths that are not a multiple of 64)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lorakit.adapters.qlora.streamed import chunk_rows, quantize_4bit_by_rows


def _whole(weight: torch.Tensor, quant_type: str, double_quant: bool):
    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=double_quant,
                             quant_type=quant_type).to("cpu")


@pytest.mark.parametrize("shape,rows_per_chunk,quant_type,double_quant", [
    ((1000, 128), 64, "nf4", True),      # 16 chunks, the last one short
    ((320, 96), 128, "nf4", True),       # 96 columns: blocks of 64 cross rows, chunks still hold whole blocks
    ((256, 64), 192, "fp4", False),
    ((130, 256), None, "nf4", True),     # the default chunking: one chunk
])
def test_quantizing_by_rows_equals_quantizing_whole(shape, rows_per_chunk, quant_type, double_quant):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    weight[3, :5] = 0.5  # an outlier block
    reads = []

    def read_rows(start, stop):
        reads.append(stop - start)
        return weight[start:stop]  # bf16 rows, converted to fp32 like a streamed checkpoint

    streamed = quantize_4bit_by_rows(read_rows, shape, torch.float32, quant_type, double_quant, rows_per_chunk)
    whole = _whole(weight.float(), quant_type, double_quant)
    assert max(reads) == (rows_per_chunk or shape[0]) and sum(reads) == shape[0]
    assert torch.equal(streamed.data, whole.data)
    ours, theirs = streamed.quant_state, whole.quant_state
    assert torch.equal(ours.absmax, theirs.absmax)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert ours.nested == theirs.nested == double_quant
    if double_quant:
        assert torch.equal(ours.offset, theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax) and torch.equal(ours.state2.code, theirs.state2.code)
    dequantized = bnb.functional.dequantize_4bit(streamed.data, ours)
    assert torch.equal(dequantized, bnb.functional.dequantize_4bit(whole.data, theirs))


def test_chunks_hold_whole_blocks_and_about_the_asked_values():
    assert chunk_rows(3072) == 2688 and chunk_rows(3072) % 64 == 0
    assert chunk_rows(10**8) == 64  # one row would exceed the budget: still a whole number of blocks
