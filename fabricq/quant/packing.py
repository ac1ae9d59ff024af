"""Dense packing of b-bit signed codes into int32 words (the compressed-tensors layout).

Along the packed dimension, code i (offset by 2^(b-1) to be unsigned) occupies bits
[i·b, (i+1)·b) of the row's bit stream, least significant bit first, 32 bits per word; a code
may straddle two words (3 bits), and the last word is zero-padded.
"""

from __future__ import annotations

import sys

import torch

# Bytes in memory are the words' bits in order (least significant byte first), so for widths
# that divide 8 a row's byte stream is the packed row itself: codes combine into bytes and the
# bytes are read as int32 words, with no 64-bit intermediates (8–16x less memory traffic).
_BYTE_PATH = sys.byteorder == "little"


def packed_width(length: int, bits: int) -> int:
    return -(-length * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes (rows, cols) on [-2^(b-1), 2^(b-1)) into int32 along `dim`."""
    if dim == 0:
        return pack_int32(codes.T, bits, 1).T.contiguous()
    rows, cols = codes.shape
    if _BYTE_PATH and 8 % bits == 0:
        return _pack_bytes(codes, bits)
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
    if _BYTE_PATH and 8 % bits == 0:
        return _unpack_bytes(packed, bits, length)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], 1)
    start = torch.arange(length, device=packed.device, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    stream = words[:, word] >> offset | (words[:, word + 1] << (32 - offset))
    values = stream & ((1 << bits) - 1)
    return (values - (1 << (bits - 1))).to(torch.int8)


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_int32` along dim 1 for bits in (2, 4, 8): 8/bits codes per byte, low bits first."""
    rows, cols = codes.shape
    per_byte = 8 // bits
    words = packed_width(cols, bits)
    values = torch.zeros(rows, words * 32 // bits, dtype=torch.uint8, device=codes.device)  # zero padding
    torch.add(codes, 1 << (bits - 1), out=values[:, :cols].view(torch.int8))  # wraps to the unsigned code
    values = values.view(rows, -1, per_byte)
    stream = values[:, :, 0].clone()
    for i in range(1, per_byte):
        stream |= values[:, :, i] << (i * bits)
    return stream.view(torch.int32)


def _unpack_bytes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """`unpack_int32` along dim 1 for bits in (2, 4, 8)."""
    rows = packed.shape[0]
    stream = packed.contiguous().view(torch.uint8)  # (rows, 4·words)
    mask = (1 << bits) - 1
    values = torch.stack([(stream >> (i * bits)) & mask for i in range(8 // bits)], dim=2).view(rows, -1)
    return values[:, :length].view(torch.int8) - (1 << (bits - 1))  # int8 arithmetic wraps back
