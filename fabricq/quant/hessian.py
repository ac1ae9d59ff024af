"""Accumulating the GPTQ Hessian H = mean over tokens of x·xᵀ.

Sums are kept as sums (never running averages) in float32 or float64 and divided once, at the
end, by the total token count: a running average rescales the sum at every step and its rounding
error grows with the number of batches. Partial sums from several ranks add exactly the same way.

H is symmetric, so each wide batch only computes its lower triangle, in column strips (a few large
matrix products instead of one, ~1/3 less work); narrow ones get one plain product. Either way the
upper triangle is mirrored from the lower one whenever the sum is read, which makes `sum` exactly
symmetric (a plain product is not bit-symmetric). Ranks add up their
`partial_sum`s in place and the rank(s) holding the total record its token count with
`install_total`.
"""

from __future__ import annotations

import torch

from fabricq.quant.gram import accumulate_gram, uses_bf16_products

# Widths below this get one plain product: strips would be too narrow to be efficient.
MIN_STRIPPED_WIDTH = 256
STRIPS = 4


def _strip_edges(columns: int) -> list[int]:
    strips = STRIPS if columns >= MIN_STRIPPED_WIDTH else 1
    return [round(i * columns / strips) for i in range(strips + 1)]


class HessianAccumulator:
    """Sum of x·xᵀ and a token count for one input width (shared by modules reading that input)."""

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device=None):
        self._sum = torch.zeros(columns, columns, dtype=dtype, device=device)
        self._edges = _strip_edges(columns)
        self._upper_stale = False
        self._tokens = 0

    @property
    def tokens(self) -> int:
        """Tokens added here, or in the total `install_total` recorded."""
        return self._tokens

    @property
    def sum(self) -> torch.Tensor:
        """The full symmetric sum of x·xᵀ."""
        if self._upper_stale:
            lower = self._sum.tril()
            self._sum.copy_(lower + lower.tril(-1).T)
            self._upper_stale = False
        return self._sum

    @property
    def partial_sum(self) -> torch.Tensor:
        """The sum as accumulated, for a collective to add up across ranks in place (then
        `install_total`): exact on and below the diagonal. Mirroring it here would make every
        rank do it before sending; the rank that reads the total does it once instead."""
        return self._sum

    def install_total(self, tokens: int) -> None:
        """`partial_sum` now holds the total over every rank (a collective wrote it in place), of
        `tokens` tokens in all. Its lower triangle is exact; the upper one is mirrored from it
        when read, as after `add`."""
        self._tokens = tokens
        self._upper_stale = True

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (..., columns); every leading index is one token."""
        x = x.reshape(-1, x.shape[-1])
        if not uses_bf16_products(x, self._sum):  # bf16 activations on a native-bf16 host stay bf16
            x = x.to(self._sum.dtype)
        if x.shape[1] != self._sum.shape[0]:
            raise RuntimeError(f"input width {x.shape[1]} does not match the Hessian's {self._sum.shape[0]}")
        edges = self._edges
        if len(edges) == 2:
            accumulate_gram(self._sum, x)
        else:
            # Strip j: rows from its first column down, i.e. the lower triangle block column.
            for start, end in zip(edges[:-1], edges[1:]):
                accumulate_gram(self._sum[start:, start:end], x[:, start:], x[:, start:end])
        self._upper_stale = True
        self._tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        return self.sum / self.tokens
