"""Accumulating the GPTQ Hessian H = mean over tokens of x·xᵀ.

Sums are kept as sums (never running averages) in float32 or float64 and divided once, at the
end, by the total token count: a running average rescales the sum at every step and its rounding
error grows with the number of batches. Partial sums from several ranks add exactly the same way.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Sum of x·xᵀ and a token count for one input width (shared by modules reading that input)."""

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device=None):
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (..., columns); every leading index is one token."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        return self.sum / self.tokens
