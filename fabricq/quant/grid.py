"""Integer quantization grids: which values a weight may take after quantization.

A grid is described by `QuantScheme` (bits, group size, symmetry, act-order). Codes are signed
integers in [-2^(b-1), 2^(b-1) - 1]; a weight is dequantized as (code - zero) * scale, where
scale and zero belong to the weight's row and column group. This is the convention the
compressed-tensors format uses, so codes can be packed and exported without re-quantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
ACTORDERS = ("none", "static", "dynamic", "folded")


@dataclass(frozen=True)
class QuantScheme:
    """How the weights of one Linear module are quantized.

    group_size: columns sharing one scale/zero per row; -1 means one per row (per-channel).
    actorder: "none" solves columns left to right; "static" solves them in descending
    Hessian-diagonal order while groups stay contiguous (scales fixed up front, nothing extra
    saved); "dynamic" lets groups follow the solve order (a g_idx maps columns to groups);
    "folded" is a run-level choice (dynamic where the order folds into the weights, static
    elsewhere: fabricq.quant.fold), resolved per module before any solve.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    actorder: str = "static"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(
                f"group_size must be a positive integer or -1 (per-channel), got {self.group_size}"
            )
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder must be one of {ACTORDERS}, got {self.actorder!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups_for(self, columns: int) -> int:
        """Number of column groups for a matrix with `columns` input columns."""
        return 1 if self.group_size == -1 else -(-columns // self.group_size)


def effective_group_size(requested: int, columns: int) -> int:
    """The group size actually used for a module with `columns` input columns.

    compressed-tensors and vLLM's kernels require the group size to divide the input width, and
    576 or 1536 (SmolLM2) are not multiples of 128. Rather than ragged last groups that no
    loader accepts, we fall back, per module, to the largest divisor of `columns` that is not
    above the request, is a multiple of min(requested, 32) and is a power of two (vLLM's Marlin
    kernels take group sizes 32, 64 and 128 only: 576 with 128 gives 64, not 96); if there is
    none, to per-channel (-1).
    """
    if requested == -1 or columns % requested == 0:
        return requested
    align = min(requested, 32)
    for size in range(requested - requested % align, 0, -align):
        if columns % size == 0 and size & (size - 1) == 0:
            return size
    return -1


def compute_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` (rows, columns-of-one-group), min-max style.

    The scale is rounded to `scale_dtype` (the dtype it will be stored in) before use, so the
    grid we optimise on is exactly the grid a loader reconstructs.
    """
    w = w.float()
    levels = (1 << scheme.bits) - 1
    if scheme.symmetric:
        absmax = w.abs().amax(dim=1)
        scale = absmax / (levels / 2)
        zero = torch.zeros_like(scale)
    else:
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / levels
    # A row of zeros gets scale 1: its codes are then exactly zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype).float()
    if not scheme.symmetric:
        zero = (scheme.qmin - torch.round(wmin / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid; scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, scheme.qmin, scheme.qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """`dequantize_codes` with (rows, groups) params and each column's group in `g_idx`. When the
    groups are contiguous runs of equal width (no act-order, static act-order) the params are
    broadcast over a (rows, groups, width) view instead of expanded to full size: the same
    values, without two (rows, columns) float temporaries."""
    rows, columns = codes.shape
    groups = scale.shape[1]
    if columns % groups == 0:
        width = columns // groups
        contiguous = torch.arange(columns, device=g_idx.device) // width
        if torch.equal(g_idx.to(contiguous.dtype), contiguous):
            grouped = dequantize_codes(codes.reshape(rows, groups, width), scale[:, :, None], zero[:, :, None])
            return grouped.view(rows, columns)
    return dequantize_codes(codes, expand_groups(scale, g_idx), expand_groups(zero, g_idx))


def expand_groups(params: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """(rows, groups) per-group values → (rows, columns) per-column values."""
    # index_select, not params[:, g_idx]: the same copy, several times faster on CPU.
    return params.index_select(1, g_idx.to(device=params.device, dtype=torch.long))
