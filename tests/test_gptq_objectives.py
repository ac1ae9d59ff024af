"""The report's batched float32 objectives against the float64 `layer_objective`."""

from __future__ import annotations

import torch

from fabricq.quant.gptq import gptq_quantize, layer_objective, layer_objectives, rtn_quantize
from fabricq.quant.grid import QuantScheme


def test_batched_objectives_match_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 320, generator=g) * (torch.rand(320, generator=g) + 0.2) + 0.3
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(96, 320, generator=g) * 0.05
    scheme = QuantScheme(4, 64, True, "static")
    candidates = [gptq_quantize(weight, hessian, scheme).dequantize(), rtn_quantize(weight, scheme).dequantize()]
    got = layer_objectives(weight, candidates, hessian)
    expected = [layer_objective(weight, q, hessian) for q in candidates]
    assert got[0] < got[1]  # GPTQ beats round-to-nearest on its own objective
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * b
