"""GPTQ (Frantar et al., 2022) and round-to-nearest, as pure functions of a weight and a Hessian.

Read top to bottom: `prepare_hessian` finds dead columns, the act-order permutation and the
Cholesky factor of the damped inverse Hessian (once per Hessian, i.e. per shared input);
`gptq_solve` walks a weight's columns in blocks, quantizing one column at a time and spreading
its error over the columns not yet quantized; `gptq_quantize` is the two for one module.
`rtn_quantize` is the baseline on the same grid. All return a `QuantizedWeight` in the original
column order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from fabricq.quant.grid import (
    QuantScheme,
    compute_qparams,
    dequantize_groups,
    expand_groups,
    quantize_codes,
)
from fabricq.quant.packing import pack_int32, unpack_int32


@dataclass
class QuantizedWeight:
    """One Linear module's weight after quantization, in original column order.

    codes: int8 (rows, columns) on [qmin, qmax]; scale: float32 (rows, groups), already rounded
    to the dtype it is stored in; zero: float32 (rows, groups) integer-valued (all zero when
    symmetric); g_idx: int32 (columns,) group of each column.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    scheme: QuantScheme
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scale, self.zero, self.g_idx)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def split_rows(self, rows: list[int]) -> list["QuantizedWeight"]:
        """The results of modules solved stacked (`rows` each, in order), each with tensors of its
        own: a checkpoint writer refuses tensors that share memory."""
        parts = zip(self.codes.split(rows), self.scale.split(rows), self.zero.split(rows))
        return [QuantizedWeight(c.clone(), s.clone(), z.clone(), self.g_idx.clone(), self.scheme, dict(self.info))
                for c, s, z in parts]

    def packed(self) -> "PackedQuantizedWeight":
        return PackedQuantizedWeight(pack_int32(self.codes, self.scheme.bits), self.codes.shape[1], self.scale,
                                     self.zero, self.g_idx, self.scheme, self.info)


@dataclass
class PackedQuantizedWeight:
    """A QuantizedWeight held with its codes packed into int32 words (`pack_int32` along the
    columns, the layout compressed-tensors stores): what a run keeps of every finished module
    until export, 4-bit codes in half the bytes of int8. `codes` unpacks on demand."""

    packed_codes: torch.Tensor
    columns: int
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    scheme: QuantScheme
    info: dict = field(default_factory=dict)

    @property
    def codes(self) -> torch.Tensor:
        return unpack_int32(self.packed_codes, self.scheme.bits, self.columns)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed_codes.shape[0], self.columns)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes, self.scale, self.zero, self.g_idx)


class HessianNotPositiveDefinite(RuntimeError):
    pass


def layer_objective(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the output error GPTQ minimises, in float64."""
    err = (weight.double() - dequantized.double())
    return float(((err @ hessian.double()) * err).sum())


def layer_objectives(weight: torch.Tensor, candidates: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """tr((W - Q) H (W - Q)^T) for several Q at once, for reports: one float32 product for all of
    them (each row of the result is a dot product of cols float32 terms, relative error ~1e-6)
    and float64 sums; `layer_objective` is the float64 reference."""
    w = weight.float()
    err = torch.cat([w - q.to(w) for q in candidates])
    products = (err @ hessian.to(w)) * err
    return [float(p.sum(dtype=torch.float64)) for p in products.split(weight.shape[0])]


def _contiguous_group_index(columns: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(columns, dtype=torch.int32)
    return torch.arange(columns, dtype=torch.int32) // group_size


def _group_params_upfront(w: torch.Tensor, scheme: QuantScheme, scale_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale/zero from `w` as it is, groups contiguous in its column order."""
    rows, columns = w.shape
    size = columns if scheme.group_size == -1 else scheme.group_size
    if columns % size == 0 and w.is_contiguous():
        # All groups at once: each (row, group) is one row of this view; same values as the loop.
        scale, zero = compute_qparams(w.view(rows * (columns // size), size), scheme, scale_dtype)
        return scale.view(rows, -1), zero.view(rows, -1)
    pairs = [compute_qparams(w[:, c : c + size], scheme, scale_dtype) for c in range(0, columns, size)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def rtn_quantize(weight: torch.Tensor, scheme: QuantScheme, scale_dtype=torch.float32) -> QuantizedWeight:
    """Round each weight to the nearest grid point (groups contiguous, min-max params)."""
    w = weight.float().contiguous()
    rows, columns = w.shape
    scale, zero = _group_params_upfront(w, scheme, scale_dtype)
    g_idx = _contiguous_group_index(columns, scheme.group_size)
    size = columns if scheme.group_size == -1 else scheme.group_size
    if columns % size == 0:  # broadcast each group's params over its columns instead of expanding them
        codes = quantize_codes(w.view(rows, -1, size), scale[:, :, None], zero[:, :, None], scheme).view(rows, columns)
    else:
        codes = quantize_codes(w, expand_groups(scale, g_idx), expand_groups(zero, g_idx), scheme)
    return QuantizedWeight(codes.to(torch.int8), scale, zero, g_idx, scheme, {"method": "rtn"})


def _lower_triangular_inverse(lower: torch.Tensor, base: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix, by halves: [[A, 0], [B, C]]⁻¹ is
    [[A⁻¹, 0], [-C⁻¹·B·A⁻¹, C⁻¹]]. The off-diagonal block is two matrix products, which run
    near the machine's peak; a triangular solve against the identity does three times the
    arithmetic at a lower rate (1536 columns, one thread: 33 ms here against 108 ms)."""
    n = lower.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device), upper=False)
    m = n // 2
    a_inv = _lower_triangular_inverse(lower[:m, :m], base)
    c_inv = _lower_triangular_inverse(lower[m:, m:], base)
    out = torch.zeros_like(lower)
    out[:m, :m] = a_inv
    out[m:, m:] = c_inv
    out[m:, :m] = -(c_inv @ (lower[m:, :m] @ a_inv))
    return out


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)^-1, λ = damp · mean(diag H).

    Row i of U, scaled by 1/U[i, i], is how quantizing column i should update the columns after
    it (the GPTQ update rule expressed through Cholesky, which is numerically stable).

    With J the order reversal and L the lower Cholesky factor of J(H + λI)J, U = J·L⁻¹·J:
    it is upper triangular with a positive diagonal and UᵀU = J·L⁻ᵀ·L⁻¹·J = (J·L·Lᵀ·J)⁻¹ =
    (H + λI)⁻¹, so it is that factor — found with one Cholesky and one triangular inverse instead
    of a Cholesky, an inverse from it and a second Cholesky (1536 columns: 64 ms against 112 ms,
    and closer to a float64 computation).
    """
    h = hessian.flip(0, 1)  # a copy
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise HessianNotPositiveDefinite(f"Cholesky of the damped Hessian failed (damp={damp})")
    upper = _lower_triangular_inverse(lower).flip(0, 1)
    if not torch.isfinite(upper).all():
        raise HessianNotPositiveDefinite(f"the inverse of the damped Hessian's Cholesky factor is not finite (damp={damp})")
    return upper


def _block_boundaries(columns: int, block_size: int, group_starts: list[int]) -> list[int]:
    """Block edges every `block_size` columns, plus every group start, so that a group's scale
    is always computed at a block start, where the weights hold every update so far."""
    edges = set(range(0, columns, block_size)) | set(group_starts) | {columns}
    return sorted(e for e in edges if 0 <= e <= columns)


def _solve_block(w, codes, col_scale, col_zero, upper, i1: int, i2: int, scheme: QuantScheme) -> torch.Tensor:
    """Quantize columns i1..i2 of `w` one at a time (codes into `codes`), each column's error
    spread over the block's later columns; returns the block's scaled errors (rows, i2 - i1).

    The arithmetic is `quantize_codes` / `dequantize_codes` column by column; it works in
    transposed, contiguous (columns, rows) buffers so every per-column step reads and writes one
    contiguous row, and the error spreading is a single in-place rank-1 update (`addr_`)."""
    block = w[:, i1:i2].T.contiguous()  # (block columns, rows)
    scale = col_scale[:, i1:i2].T.contiguous()
    zero = None if scheme.symmetric else col_zero[:, i1:i2].T.contiguous()
    errors = torch.empty_like(block)
    block_codes = torch.empty_like(block)
    u_block = upper[i1:i2, i1:i2]
    inv_diag = (1.0 / u_block.diagonal()).tolist()
    qmin, qmax = scheme.qmin, scheme.qmax
    for i in range(i2 - i1):
        column, s, q, err = block[i], scale[i], block_codes[i], errors[i]
        torch.div(column, s, out=q).round_()
        if zero is not None:
            q.add_(zero[i])
        q.clamp_(qmin, qmax)
        # err = (w - (q - z)·s) / d
        if zero is None:
            torch.mul(q, s, out=err)
        else:
            torch.sub(q, zero[i], out=err).mul_(s)
        err.sub_(column).mul_(-inv_diag[i])
        if i + 1 < i2 - i1:
            block[i + 1 :].addr_(u_block[i, i + 1 :], err, alpha=-1)
    codes[:, i1:i2] = block_codes.T
    return errors.T


@dataclass
class PreparedHessian:
    """What GPTQ needs from one Hessian, shared by every module that reads the same input
    (q/k/v, gate/up): it depends on the Hessian and the act-order only, never on a weight.

    dead: bool (columns,) columns no input ever reached; perm: (columns,) solve order (act-order
    depends on diag(H) alone); upper: upper Cholesky factor of the damped inverse Hessian in solve
    order, or None when no damping up to `max_damp` made it positive definite (the modules then
    fall back to round-to-nearest); damp: the damping used, or the last one tried if upper is None.
    """

    dead: torch.Tensor
    perm: torch.Tensor
    upper: torch.Tensor | None
    damp: float
    actorder: str


def prepare_hessian(hessian: torch.Tensor, actorder: str, *, damp: float = 0.01,
                    max_damp: float = 10.0, order: torch.Tensor | None = None) -> PreparedHessian:
    """Dead columns, act-order permutation and the damped inverse factor of `hessian` (columns,
    columns); damping grows tenfold while the damped Hessian is not positive definite, up to
    `max_damp`. `order`: a solve order to use instead of the descending diagonal (folded
    act-order's o_proj, `fabricq.quant.fold.head_order`); only with actorder "dynamic", whose
    groups follow the solve order."""
    if actorder == "folded":
        raise ValueError("actorder 'folded' is resolved per module (static or dynamic) before solving: "
                         "see fabricq.callbacks.solver")
    if order is not None and actorder != "dynamic":
        raise ValueError(f"a given solve order needs actorder 'dynamic', not {actorder!r}")
    columns = hessian.shape[0]
    h = hessian.to(dtype=torch.float32).clone()

    # Columns that never saw a non-zero input cannot affect the output (their weights are zeroed).
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0

    if actorder == "none":
        perm = torch.arange(columns, device=h.device)
    elif order is not None:
        perm = order.to(device=h.device, dtype=torch.long)
        if not torch.equal(torch.sort(perm).values, torch.arange(columns, device=h.device)):
            raise ValueError(f"order is not a permutation of {columns} columns")
    else:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    h = h.index_select(0, perm).index_select(1, perm)  # index_select: a plain, fast gather

    used_damp = damp
    while True:
        try:
            upper = inverse_hessian_factor(h, used_damp)
            return PreparedHessian(dead, perm, upper, used_damp, actorder)
        except HessianNotPositiveDefinite:
            if used_damp * 10 > max_damp:
                return PreparedHessian(dead, perm, None, used_damp, actorder)
            used_damp *= 10


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    max_damp: float = 10.0,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "module",
) -> QuantizedWeight:
    """Quantize `weight` (rows, columns) minimising tr((W-Q) H (W-Q)^T) column by column.

    `hessian` is the (columns, columns) mean of x·xᵀ over calibration inputs. If the damped
    Hessian is not positive definite, damping grows tenfold up to `max_damp`; past that the
    module falls back to round-to-nearest with a warning naming it. Modules sharing a Hessian
    can call `prepare_hessian` once and `gptq_solve` for each: the results are the same.
    """
    prepared = prepare_hessian(hessian.to(weight.device), scheme.actorder, damp=damp, max_damp=max_damp)
    return gptq_solve(weight, prepared, scheme, block_size=block_size, scale_dtype=scale_dtype, name=name)


def gptq_solve(
    weight: torch.Tensor,
    prepared: PreparedHessian,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "module",
    grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """GPTQ of `weight` (rows, columns) on a Hessian prepared by `prepare_hessian`. `grid`: fixed
    (scale, zero, g_idx) of an existing result — only the codes are chosen, in the prepared
    order (re-quantizing onto a checkpoint's grid, `fabricq.recovery.merge`)."""
    if prepared.actorder != scheme.actorder:
        raise ValueError(f"Hessian prepared for actorder={prepared.actorder!r}, scheme has {scheme.actorder!r}")
    rows, columns = weight.shape
    dead = prepared.dead.to(weight.device)
    if prepared.upper is None:
        warnings.warn(
            f"{name}: Hessian is not positive definite even with damp={prepared.damp:g}; "
            "falling back to round-to-nearest for this module",
            RuntimeWarning,
            stacklevel=2,
        )
        w = weight.float().masked_fill(dead, 0.0)
        if grid is None:
            result = rtn_quantize(w, scheme, scale_dtype)
        else:
            scale, zero, g_idx = grid
            codes = quantize_codes(w, expand_groups(scale.float(), g_idx), expand_groups(zero.float(), g_idx), scheme)
            result = QuantizedWeight(codes.to(torch.int8).cpu(), scale.cpu(), zero.cpu(), g_idx.cpu(), scheme, {})
        result.info.update(method="rtn_fallback", damp=None)
        return result
    w = weight.float().clone()
    w.masked_fill_(dead, 0.0)
    perm = prepared.perm.to(w.device)
    upper = prepared.upper.to(w.device)
    used_damp = prepared.damp

    static_params = None
    if grid is not None:
        static_params = (grid[0].to(w.device), grid[1].to(w.device))
        orig_g_idx = grid[2].to(device=w.device, dtype=torch.long)
    elif scheme.actorder == "static":
        # Groups stay contiguous in the original order, so their scales are fixed up front.
        static_params = _group_params_upfront(w, scheme, scale_dtype)
        orig_g_idx = _contiguous_group_index(columns, scheme.group_size).to(w.device)
    w = w.index_select(1, perm)

    size = columns if scheme.group_size == -1 else scheme.group_size
    if static_params is not None:
        group_starts = []
        col_scale = expand_groups(static_params[0], orig_g_idx[perm])
        col_zero = expand_groups(static_params[1], orig_g_idx[perm])
    else:
        group_starts = list(range(0, columns, size))
        col_scale = torch.empty_like(w)
        col_zero = torch.empty_like(w)
    group_scales, group_zeros = [], []

    codes = torch.empty_like(w)
    edges = _block_boundaries(columns, block_size, group_starts)
    group_start_set = set(group_starts)
    for i1, i2 in zip(edges[:-1], edges[1:]):
        if i1 in group_start_set:
            # Params for the group starting here, from weights carrying all updates so far.
            scale, zero = compute_qparams(w[:, i1 : i1 + size], scheme, scale_dtype)
            group_scales.append(scale)
            group_zeros.append(zero)
            end = min(i1 + size, columns)
            col_scale[:, i1:end] = scale[:, None]
            col_zero[:, i1:end] = zero[:, None]
        errors = _solve_block(w, codes, col_scale, col_zero, upper, i1, i2, scheme)
        # Lazy batch update: the rest of the matrix learns of this block's errors at once.
        w[:, i2:].addmm_(errors, upper[i1:i2, i2:], alpha=-1)

    inverse_perm = torch.argsort(perm)
    codes = codes.index_select(1, inverse_perm)
    if static_params is not None:
        scale, zero = static_params
        g_idx = orig_g_idx.to(torch.int32)
    elif scheme.actorder == "dynamic":
        scale, zero = torch.stack(group_scales, 1), torch.stack(group_zeros, 1)
        solve_group = _contiguous_group_index(columns, scheme.group_size).to(w.device)
        g_idx = solve_group[inverse_perm].to(torch.int32)
    else:
        scale, zero = torch.stack(group_scales, 1), torch.stack(group_zeros, 1)
        g_idx = _contiguous_group_index(columns, scheme.group_size).to(w.device)
    return QuantizedWeight(
        codes.to(torch.int8).cpu(),
        scale.cpu(),
        zero.cpu(),
        g_idx.cpu(),
        scheme,
        {"method": "gptq", "damp": used_damp},
    )
