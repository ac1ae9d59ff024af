"""Gram products leftᵀ·right for the Hessian, including from bfloat16 activations.

torch 2.13 has no bf16 × bf16 → float32 matrix product on CPU: `mm(..., out_dtype=)` is CUDA-only,
and `addmm` refuses a float32 `self` or `out` with bf16 matrices. oneDNN's float32 "bf16 math
mode" (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`) would compute bf16 products into
float32 exactly, but it is one process-wide switch: while set, the float32 GPTQ solves running on
other threads would be rounded to bf16 too. So a bf16 product is computed by the bf16 kernel
(which accumulates in float32 inside) and its result, rounded once to bf16, is added to the
float32 sum: activations are neither converted nor copied on the way. The price is that one
rounding per call (relative error at most 2⁻⁸ per element of each call's product), where the
float32 conversion is exact up to float32 accumulation.

Whether bf16 products are used is a property of the host (does it compute bf16 natively?), so it
is one switch here, set once per run from the CPU's flags (`fabricq.precision`); off by default,
which keeps the conversion to the Hessian's dtype.
"""

from __future__ import annotations

import torch

_bf16_products = False


def enable_bf16_products(enabled: bool) -> None:
    """Let Hessians of bf16 activations use bf16 products (see the module docstring)."""
    global _bf16_products
    _bf16_products = bool(enabled)


def bf16_products_enabled() -> bool:
    return _bf16_products


def uses_bf16_products(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `accumulate_gram(out, x)` should get `x` as it is (bf16) rather than converted to
    `out`'s dtype: bf16 activations, a float32 sum, and the switch on."""
    return _bf16_products and x.dtype == torch.bfloat16 and out.dtype == torch.float32


def accumulate_gram(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None = None) -> None:
    """out += leftᵀ·right (right defaults to left), in place.

    bf16 `left`/`right` and a float32 `out`: one bf16 product (float32 accumulation inside the
    kernel, the result rounded to bf16), added in float32. Otherwise the inputs are converted to
    `out`'s dtype and multiplied in it; inputs already in that dtype give exactly `out.addmm_`.
    """
    right = left if right is None else right
    if left.dtype == right.dtype == torch.bfloat16 and out.dtype == torch.float32:
        out.add_(torch.mm(left.T, right))
    else:
        out.addmm_(left.T.to(out.dtype), right.to(out.dtype))
