"""HessianAccumulator: H = sum over tokens of x xᵀ / token count, against a float64 computation."""

from __future__ import annotations

import pytest
import torch

from fabricq.quant.hessian import HessianAccumulator


def _batches(columns, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Non-zero mean and uneven column scales, as real activations have.
    col_scale = torch.rand(columns, generator=g) * 3 + 0.1
    return [(torch.randn(*shape, columns, generator=g) + 0.5) * col_scale for shape in shapes]


def _reference(batches):
    x = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches]).double()
    return x.T @ x / x.shape[0], x.shape[0]


SHAPES = [(1,), (7,), (3, 5), (2, 4, 9), (33,), (1, 1), (128,)]


def test_matches_float64_all_at_once():
    batches = _batches(48, SHAPES)
    acc = HessianAccumulator(48)
    for b in batches:
        acc.add(b)
    expected, tokens = _reference(batches)
    assert acc.tokens == tokens == 1 + 7 + 15 + 72 + 33 + 1 + 128
    assert acc.sum.dtype == torch.float32
    h = acc.mean()
    assert h.shape == (48, 48) and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item())
    assert torch.equal(h, h.T)  # addmm of xᵀx is exactly symmetric


def test_float64_option_is_exact_to_rounding():
    batches = _batches(40, SHAPES, seed=1)
    acc = HessianAccumulator(40, dtype=torch.float64)
    for b in batches:
        acc.add(b)  # float32 inputs are converted, not truncated
    expected, _ = _reference(batches)
    assert acc.sum.dtype == torch.float64 and acc.mean().dtype == torch.float64
    torch.testing.assert_close(acc.mean(), expected, rtol=1e-12, atol=1e-12)


def test_accepts_bfloat16_inputs():
    batches = [b.to(torch.bfloat16) for b in _batches(16, [(4, 8), (5,)], seed=2)]
    acc = HessianAccumulator(16)
    for b in batches:
        acc.add(b)
    expected, _ = _reference([b.float() for b in batches])  # the bf16 values, exactly
    torch.testing.assert_close(acc.mean().double(), expected, rtol=1e-6, atol=1e-6)


def test_is_a_sum_not_a_running_average():
    # One huge batch then many tiny ones: a running average would rescale the sum each step.
    batches = _batches(8, [(4096,)] + [(1,)] * 300, seed=3)
    acc = HessianAccumulator(8)
    for b in batches:
        acc.add(b)
    expected, tokens = _reference(batches)
    assert acc.tokens == tokens
    torch.testing.assert_close(acc.sum.double(), expected * tokens, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(acc.mean().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_ranks_sum_then_divide_once(dtype):
    batches = _batches(32, SHAPES + [(6, 6)], seed=4)
    single = HessianAccumulator(32, dtype=dtype)
    rank0, rank1 = HessianAccumulator(32, dtype=dtype), HessianAccumulator(32, dtype=dtype)
    for i, b in enumerate(batches):
        single.add(b)
        (rank0 if i % 2 == 0 else rank1).add(b)
    assert rank0.tokens + rank1.tokens == single.tokens
    # What an all-reduce/reduce of the sums does: add sums and token counts, divide once.
    merged = (rank0.sum + rank1.sum) / (rank0.tokens + rank1.tokens)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(merged, single.mean(), rtol=tol, atol=tol * single.mean().abs().max().item())
    expected, _ = _reference(batches)
    scale = expected.abs().max().item()
    torch.testing.assert_close(merged.double(), expected, rtol=10 * tol, atol=10 * tol * scale)
    # Averaging the two ranks' means instead would be wrong with uneven token counts.
    assert rank0.tokens != rank1.tokens
    naive = (rank0.mean() + rank1.mean()) / 2
    assert not torch.allclose(naive.double(), expected, rtol=1e-3, atol=1e-3)


def test_zero_tokens_is_an_error():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.mean()
    acc.add(torch.zeros(0, 4))  # an empty batch adds no tokens
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.mean()


def test_width_mismatch_is_an_error():
    acc = HessianAccumulator(4)
    with pytest.raises(RuntimeError):
        acc.add(torch.randn(3, 5))


def test_wide_inputs_accumulate_lower_strips_and_read_back_full():
    # Wide enough for the strip path (lower triangle only, mirrored on read); 301 splits unevenly.
    from fabricq.quant.hessian import MIN_STRIPPED_WIDTH

    columns = 301
    assert columns >= MIN_STRIPPED_WIDTH
    batches = _batches(columns, [(64,), (3, 50), (1,), (200,)], seed=5)
    acc = HessianAccumulator(columns)
    for b in batches:
        acc.add(b)
    expected, tokens = _reference(batches)
    h = acc.mean()
    torch.testing.assert_close(h.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item())
    assert torch.equal(h, h.T)
    # Reading the sum, changing it in place (as a collective's reduction does), then adding more
    # keeps both: the upper triangle is mirrored from the updated lower triangle.
    acc.sum.mul_(2)
    extra = _batches(columns, [(40,)], seed=6)
    acc.add(extra[0])
    both, _ = _reference(batches + batches + extra)
    merged = acc.sum.double() / (2 * tokens + 40)
    torch.testing.assert_close(merged, both, rtol=2e-6, atol=2e-6 * both.abs().max().item())
    assert torch.equal(acc.sum, acc.sum.T)


@pytest.mark.parametrize("columns", [3, 64, 255, 256, 301])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_is_exactly_symmetric_at_every_width(columns, dtype):
    # One plain product (narrow inputs) is not bit-symmetric by itself; the mirrored read is.
    acc = HessianAccumulator(columns, dtype=dtype)
    for b in _batches(columns, [(97,), (3, 41)], seed=columns):
        acc.add(b)
    assert torch.equal(acc.sum, acc.sum.T)
    acc.partial_sum.mul_(3)  # as a collective adds in place, then the total is installed
    acc.install_total(3 * acc.tokens)
    assert torch.equal(acc.sum, acc.sum.T)
