"""Tests added by a mutation-testing pass over fabricq/quant (packing, grid, hessian).

Every expectation here comes from an independent reference (pure-Python integer bit packing,
hand-computed min-max parameters, float64 x·xᵀ), never from the implementation under test.
"""

from __future__ import annotations

import random

import pytest
import torch

from fabricq.quant import packing
from fabricq.quant.grid import (
    QuantScheme,
    compute_qparams,
    dequantize_codes,
    dequantize_groups,
    effective_group_size,
    expand_groups,
    quantize_codes,
)
from fabricq.quant.hessian import HessianAccumulator
from fabricq.quant.packing import pack_int32, packed_width, unpack_int32

# ----------------------------------------------------------------------------- packing


def _ref_pack_row(codes: list[int], bits: int) -> list[int]:
    """Pure-Python reference: unsigned code i at bits [i·b, (i+1)·b), LSB first, int32 words."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= (c + (1 << (bits - 1))) << (i * bits)
    words = -(-len(codes) * bits // 32)
    out = []
    for w in range(words):
        v = (stream >> (32 * w)) & 0xFFFFFFFF
        out.append(v - (1 << 32) if v >= 1 << 31 else v)
    return out


def _codes(rows: int, cols: int, bits: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    data = [[rnd.randint(lo, hi) for _ in range(cols)] for _ in range(rows)]
    data[0][0] = lo
    data[-1][-1] = hi
    if cols > 1:
        data[0][-1] = hi  # a high code in the last (padded) word
    return data


@pytest.mark.parametrize("byte_path", [True, False], ids=["byte-path", "generic-path"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 3, 5, 10, 11, 16, 21, 31, 32, 33, 64, 65])
def test_pack_matches_python_integer_reference(monkeypatch, byte_path, bits, cols):
    # The generic (int64 shift) path is what big-endian hosts use for every width; force it here.
    monkeypatch.setattr(packing, "_BYTE_PATH", byte_path)
    data = _codes(3, cols, bits, seed=bits * 100 + cols)
    codes = torch.tensor(data, dtype=torch.int8)
    expected = [_ref_pack_row(row, bits) for row in data]
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.tolist() == expected
    unpacked = unpack_int32(packed, bits, cols)
    assert unpacked.dtype == torch.int8
    assert unpacked.tolist() == data
    # Along dim 0: the same words, transposed.
    packed0 = pack_int32(codes.T.contiguous(), bits, dim=0)
    assert packed0.tolist() == [list(col) for col in zip(*expected)]
    assert unpack_int32(packed0, bits, cols, dim=0).tolist() == [list(c) for c in zip(*data)]


@pytest.mark.parametrize("byte_path", [True, False], ids=["byte-path", "generic-path"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_extremes_every_position(monkeypatch, byte_path, bits):
    # All-min codes pack to zero words; all-max codes to all-ones (except zero padding).
    monkeypatch.setattr(packing, "_BYTE_PATH", byte_path)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for cols in (7, 32, 45):
        low = torch.full((2, cols), lo, dtype=torch.int8)
        assert pack_int32(low, bits).tolist() == [[0] * packed_width(cols, bits)] * 2
        high = torch.full((2, cols), hi, dtype=torch.int8)
        assert pack_int32(high, bits).tolist() == [_ref_pack_row([hi] * cols, bits)] * 2
        assert unpack_int32(pack_int32(high, bits), bits, cols).tolist() == [[hi] * cols] * 2
        # Code zero is the unsigned midpoint 2^(b-1).
        zero = torch.zeros(1, cols, dtype=torch.int8)
        assert pack_int32(zero, bits).tolist() == [_ref_pack_row([0] * cols, bits)]


def test_pack_2bit_and_4bit_words_by_hand():
    # 4-bit: codes +8 → [0, 15, 8, 1, 2, 3, 4, 5] → nibbles LSB first.
    codes = torch.tensor([[-8, 7, 0, -7, -6, -5, -4, -3]], dtype=torch.int8)
    expected = 0x0 | 0xF << 4 | 0x8 << 8 | 0x1 << 12 | 0x2 << 16 | 0x3 << 20 | 0x4 << 24 | 0x5 << 28
    assert pack_int32(codes, 4).tolist() == [[expected]]
    # 2-bit: codes +2 → [0, 3, 2, 1, 1] → 0 | 3<<2 | 2<<4 | 1<<6 | 1<<8 = 12 + 32 + 64 + 256 = 364
    codes = torch.tensor([[-2, 1, 0, -1, -1]], dtype=torch.int8)
    assert pack_int32(codes, 2).tolist() == [[364]]
    assert unpack_int32(torch.tensor([[364]], dtype=torch.int32), 2, 5).tolist() == [[-2, 1, 0, -1, -1]]


@pytest.mark.parametrize("length, bits, words", [(1, 2, 1), (16, 2, 1), (17, 2, 2), (8, 4, 1), (9, 4, 2),
                                                  (10, 3, 1), (11, 3, 2), (32, 3, 3), (4, 8, 1), (5, 8, 2),
                                                  (0, 4, 0)])
def test_packed_width_by_hand(length, bits, words):
    assert packed_width(length, bits) == words


# ----------------------------------------------------------------------------- grid


def test_scheme_defaults_and_validation():
    s = QuantScheme()
    assert (s.bits, s.group_size, s.symmetric, s.actorder) == (4, 128, True, "static")
    QuantScheme(group_size=-1)
    QuantScheme(group_size=1)
    for bad in (0, -2):
        with pytest.raises(ValueError):
            QuantScheme(group_size=bad)
    with pytest.raises(ValueError):
        QuantScheme(bits=5)
    with pytest.raises(ValueError):
        QuantScheme(actorder="random")
    for a in ("none", "static", "dynamic"):
        assert QuantScheme(actorder=a).actorder == a


@pytest.mark.parametrize("group, columns, groups", [(-1, 1, 1), (-1, 1000, 1), (128, 128, 1), (128, 129, 2),
                                                    (128, 256, 2), (128, 1, 1), (32, 100, 4), (1, 5, 5)])
def test_groups_for_by_hand(group, columns, groups):
    assert QuantScheme(group_size=group).groups_for(columns) == groups


@pytest.mark.parametrize(
    "requested, columns, expected",
    [
        (-1, 576, -1),
        (128, 576, 64),   # 576 = 64·9
        (128, 1536, 128),
        (128, 96, 32),    # 96 = 32·3: 64 does not divide, 96 is not a power of two
        (128, 100, -1),   # no multiple of 32 divides 100
        (64, 48, -1),     # align 32 → candidates 64, 32: neither divides 48
        (16, 24, -1),     # align 16 → only 16, which does not divide 24
        (8, 12, -1),
        (32, 32, 32),
        (32, 31, -1),
    ],
)
def test_effective_group_size_hand_cases(requested, columns, expected):
    # Reference by brute force of the documented rule.
    if requested == -1 or columns % requested == 0:
        ref = requested
    else:
        align = min(requested, 32)
        cands = [s for s in range(1, requested + 1) if s % align == 0 and columns % s == 0 and s & (s - 1) == 0]
        ref = max(cands) if cands else -1
    assert ref == expected
    assert effective_group_size(requested, columns) == expected


def test_effective_group_size_brute_force():
    for requested in (8, 16, 24, 32, 48, 64, 96, 128, 256):
        for columns in range(1, 600, 7):
            if columns % requested == 0:
                ref = requested
            else:
                align = min(requested, 32)
                cands = [s for s in range(align, requested + 1, align) if columns % s == 0 and s & (s - 1) == 0]
                ref = max(cands) if cands else -1
            assert effective_group_size(requested, columns) == ref, (requested, columns)


def test_compute_qparams_symmetric_hand_values():
    w = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [0.5, 0.25, -0.125]])
    scale, zero = compute_qparams(w, QuantScheme(bits=4, symmetric=True))
    # levels = 15, scale = absmax / 7.5; zero rows get scale 1.
    assert scale.tolist() == pytest.approx([3.0 / 7.5, 1.0, 0.5 / 7.5], rel=1e-6)
    assert zero.tolist() == [0.0, 0.0, 0.0]
    scale8, _ = compute_qparams(w, QuantScheme(bits=8, symmetric=True))
    assert scale8.tolist() == pytest.approx([3.0 / 127.5, 1.0, 0.5 / 127.5], rel=1e-6)
    scale2, _ = compute_qparams(w, QuantScheme(bits=2, symmetric=True))
    assert scale2.tolist() == pytest.approx([3.0 / 1.5, 1.0, 0.5 / 1.5], rel=1e-6)


def test_compute_qparams_asymmetric_hand_values():
    # bits 4: levels 15, qmin -8. Row 0: min -1, max 2 → scale 0.2, zero = -8 - round(-1/0.2) = -3.
    # Row 1: all positive (min clamps to 0) → scale 3/15, zero = -8.
    # Row 2: all negative (max clamps to 0) → scale 1.5/15 = 0.1, zero = -8 - round(-15) = 7.
    # Row 3: constant zero → scale 1, zero -8.
    w = torch.tensor([[-1.0, 0.5, 2.0], [1.0, 3.0, 2.0], [-1.5, -0.5, -1.0], [0.0, 0.0, 0.0]])
    scale, zero = compute_qparams(w, QuantScheme(bits=4, symmetric=False))
    assert scale.tolist() == pytest.approx([0.2, 0.2, 0.1, 1.0], rel=1e-6)
    assert zero.tolist() == [-3.0, -8.0, 7.0, -8.0]


def test_compute_qparams_scale_is_stored_dtype_value():
    w = torch.tensor([[1.0 / 3.0, -0.1]])
    scale, _ = compute_qparams(w, QuantScheme(bits=4), scale_dtype=torch.bfloat16)
    assert scale.dtype == torch.float32
    expected = torch.tensor([(1.0 / 3.0) / 7.5]).to(torch.bfloat16).float()
    assert torch.equal(scale, expected)


def test_quantize_codes_hand_values():
    s = QuantScheme(bits=3)  # codes on [-4, 3]
    w = torch.tensor([[0.0, 0.26, -0.26, 0.74, 5.0, -5.0, 0.5, 1.5]])
    codes = quantize_codes(w, torch.tensor([[0.5]]), torch.tensor([[0.0]]), s)
    # w/scale: 0, .52, -.52, 1.48, 10, -10, 1 (exact), 3
    assert codes.tolist() == [[0.0, 1.0, -1.0, 1.0, 3.0, -4.0, 1.0, 3.0]]
    # With a zero point the codes shift before clamping.
    codes = quantize_codes(w, torch.tensor([[0.5]]), torch.tensor([[-2.0]]), s)
    assert codes.tolist() == [[-2.0, -1.0, -3.0, -1.0, 3.0, -4.0, -1.0, 1.0]]


def test_dequantize_codes_hand_values():
    codes = torch.tensor([[-3, 0, 2]], dtype=torch.int8)
    out = dequantize_codes(codes, torch.tensor([[0.5]]), torch.tensor([[-1.0]]))
    assert out.tolist() == [[-1.0, 0.5, 1.5]]


def _dequant_loop(codes, scale, zero, g_idx):
    rows, cols = codes.shape
    out = torch.empty(rows, cols)
    for r in range(rows):
        for c in range(cols):
            g = int(g_idx[c])
            out[r, c] = (float(codes[r, c]) - float(zero[r, g])) * float(scale[r, g])
    return out


@pytest.mark.parametrize("g_idx", [[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2], [2, 2, 0, 0, 1, 1], [0, 0, 0, 1, 1, 2]])
def test_dequantize_groups_against_loop(g_idx):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (4, 6), generator=g).to(torch.int8)
    scale = torch.rand(4, 3, generator=g) + 0.1
    zero = torch.randint(-8, 8, (4, 3), generator=g).float()
    g_idx = torch.tensor(g_idx)
    out = dequantize_groups(codes, scale, zero, g_idx)
    assert torch.allclose(out, _dequant_loop(codes, scale, zero, g_idx))
    expanded = expand_groups(scale, g_idx)
    assert expanded.tolist() == [[scale[r, i].item() for i in g_idx.tolist()] for r in range(4)]


# ----------------------------------------------------------------------------- hessian


@pytest.mark.parametrize("columns", [3, 255, 256, 300])
def test_hessian_mean_matches_float64_reference(columns):
    g = torch.Generator().manual_seed(columns)
    batches = [torch.randn(2, n, columns, generator=g) for n in (3, 5, 1)]
    acc = HessianAccumulator(columns, dtype=torch.float64)
    for x in batches:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, columns) for x in batches]).double()
    assert acc.tokens == flat.shape[0] == 18
    ref_sum = flat.T @ flat
    assert torch.allclose(acc.sum, ref_sum, rtol=1e-10, atol=1e-10)
    if columns >= 256:  # stripped: upper triangle mirrored from the lower one, exactly
        assert torch.equal(acc.sum, acc.sum.T)
    assert torch.allclose(acc.mean(), ref_sum / 18, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("columns", [4, 260])
def test_hessian_install_total(columns):
    g = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(6, columns, generator=g), torch.randn(4, columns, generator=g)
    a, b = HessianAccumulator(columns, dtype=torch.float64), HessianAccumulator(columns, dtype=torch.float64)
    a.add(x1)
    b.add(x2)
    a.partial_sum.add_(b.partial_sum)  # what an all-reduce does
    a.install_total(10)
    assert a.tokens == 10
    flat = torch.cat([x1, x2]).double()
    assert torch.allclose(a.mean(), flat.T @ flat / 10, rtol=1e-10, atol=1e-10)


def test_hessian_errors():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError):
        acc.mean()
    with pytest.raises(RuntimeError):
        acc.add(torch.zeros(2, 5))
    assert acc.tokens == 0


# ----------------------------------------------------------------------------- RTN (what a checkpoint holds)


def _rtn_reference(w: torch.Tensor, bits: int, group: int, symmetric: bool):
    """Loop-per-group min-max round-to-nearest, written from the documented convention."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    levels = (1 << bits) - 1
    rows, columns = w.shape
    size = columns if group == -1 else group
    starts = list(range(0, columns, size))
    scale = torch.empty(rows, len(starts))
    zero = torch.zeros(rows, len(starts))
    codes = torch.empty(rows, columns)
    for r in range(rows):
        for g, c0 in enumerate(starts):
            seg = w[r, c0 : c0 + size]
            if symmetric:
                s = seg.abs().max() / (levels / 2)
            else:
                lo, hi = min(seg.min(), torch.tensor(0.0)), max(seg.max(), torch.tensor(0.0))
                s = (hi - lo) / levels
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.tensor(0.0) if symmetric else (qmin - torch.round(lo / s)).clamp(qmin, qmax)
            scale[r, g], zero[r, g] = s, z
            for c in range(c0, min(c0 + size, columns)):
                codes[r, c] = (torch.round(w[r, c] / s) + z).clamp(qmin, qmax)
    g_idx = [0 if group == -1 else c // size for c in range(columns)]
    return codes.to(torch.int8), scale, zero, g_idx


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("columns, group", [(12, 4), (12, -1), (10, 4), (7, 3)])
def test_rtn_matches_loop_reference(bits, symmetric, columns, group):
    from fabricq.quant.gptq import rtn_quantize

    g = torch.Generator().manual_seed(bits * 31 + columns + group)
    w = torch.randn(3, columns, generator=g)
    w[1, :] = 0.0  # an all-zero row: scale 1
    w[2, :] = w[2, :].abs() + 0.1  # all positive: asymmetric min clamps to 0
    qw = rtn_quantize(w, QuantScheme(bits=bits, group_size=group, symmetric=symmetric, actorder="none"))
    codes, scale, zero, g_idx = _rtn_reference(w, bits, group, symmetric)
    assert qw.codes.dtype == torch.int8
    assert torch.equal(qw.codes, codes)
    assert torch.allclose(qw.scale, scale, rtol=1e-6, atol=0)
    assert torch.equal(qw.zero, zero)
    assert qw.g_idx.tolist() == g_idx
