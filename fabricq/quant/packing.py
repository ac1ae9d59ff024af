"""Dense packing of b-bit signed codes into int32 words (the compressed-tensors layout).

Along the packed dimension, code i (offset by 2^(b-1) to be unsigned) occupies bits
[i·b, (i+1)·b) of the row's bit stream, least significant bit first, 32 bits per word; a code
may straddle two words (3 bits), and the last word is zero-padded.
"""

from __future__ import annotations

import torch


def packed_width(length: int, bits: int) -> int:
    return -(-length * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes (rows, cols) on [-2^(b-1), 2^(b-1)) into int32 along `dim`."""
    if dim == 0:
        return pack_int32(codes.T, bits, 1).T.contiguous()
    rows, cols = codes.shape
    values = codes.to(torch.int64) + (1 << (bits - 1))
    start = torch.arange(cols, device=codes.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    words = packed_width(cols, bits)
    # One spare word so straddling codes can spill into word+1 without bounds checks.
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    low = (values << offset) & 0xFFFFFFFF
    high = values >> (32 - offset)  # bits that did not fit in `word`; zero when none spill
    out.scatter_add_(1, word.expand(rows, -1), low)
    out.scatter_add_(1, (word + 1).expand(rows, -1), high)
    out = out[:, :words]
    # Reinterpret unsigned 32-bit values as signed int32.
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: `length` codes per row along `dim`, as int8."""
    if dim == 0:
        return unpack_int32(packed.T, bits, length, 1).T.contiguous()
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], 1)
    start = torch.arange(length, device=packed.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    stream = words[:, word] >> offset | (words[:, word + 1] << (32 - offset))
    values = stream & ((1 << bits) - 1)
    return (values - (1 << (bits - 1))).to(torch.int8)
