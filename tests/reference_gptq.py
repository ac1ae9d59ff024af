"""A deliberately simple float64 GPTQ, to check fabricq's solver against.

Textbook OBS form (Frantar et al., 2022, eq. 2-3): keep the explicit inverse of the damped
Hessian; for each column in solve order, quantize it, spread its error over the columns not yet
solved through the current inverse, then eliminate the column from the inverse. No blocks, no
Cholesky, no lazy updates, and its own min-max grid code in NumPy, so it shares no code (and no
numerical kernels) with fabricq.

Conventions (the semantics fabricq implements):
  codes are signed integers in [-2^(b-1), 2^(b-1) - 1]; value = (code - zero) * scale;
  actorder "none":    solve left to right; a group's params come from the current (updated)
                      weights when the solve reaches the group's first column;
  actorder "static":  solve in descending H-diagonal order (stable sort); groups contiguous in
                      the original order, params fixed up front from the original weights;
  actorder "dynamic": solve in the same order as static; groups are consecutive blocks of the
                      solve order, params from the current weights at the group's first column;
  dead columns (zero H diagonal): weights zeroed, diagonal set to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ReferenceResult:
    codes: np.ndarray  # int64 (rows, columns), original column order
    scale: np.ndarray  # float64 (rows, groups)
    zero: np.ndarray  # float64 (rows, groups)
    g_idx: np.ndarray  # int64 (columns,)
    dequantized: np.ndarray  # float64 (rows, columns)
    order: list  # solve order (original column indices)
    forced_ties: int = 0  # codes taken from tie_hint at near-ties


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64, copy=True)


def minmax_params(w: np.ndarray, bits: int, symmetric: bool, scale_dtype=np.float32):
    """Per-row (scale, zero) of a block `w` (rows, k), min-max style, in float64.

    The scale is rounded to the dtype it is stored in (`scale_dtype`), as a loader sees it.
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    levels = 2**bits - 1
    if symmetric:
        scale = np.abs(w).max(axis=1) / (levels / 2)
    else:
        lo = np.minimum(w.min(axis=1), 0.0)
        hi = np.maximum(w.max(axis=1), 0.0)
        scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero row
    scale = scale.astype(scale_dtype).astype(np.float64)
    if symmetric:
        zero = np.zeros_like(scale)
    else:
        zero = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    return scale, zero


def _quantize(column, scale, zero, bits, hint=None, tie_tol=0.0):
    """Codes of `column` on the grid (round half to even, then clamp).

    Where column/scale lies within `tie_tol` (in grid steps) of a rounding midpoint, float32 and
    float64 may legitimately round either way, and one such flip makes the rest of the row's
    solve diverge. If `hint` (the implementation under test's codes) picks one of the two
    neighbours there, take it. Returns (codes, number of codes changed that way).
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = column / scale
    q = np.clip(np.round(x) + zero, qmin, qmax)
    if hint is None or tie_tol <= 0:
        return q, 0
    low = np.floor(x)
    near = np.abs(x - low - 0.5) < tie_tol
    down = np.clip(low + zero, qmin, qmax)
    up = np.clip(low + 1 + zero, qmin, qmax)
    take = near & ((hint == down) | (hint == up)) & (hint != q)
    return np.where(take, hint, q), int(take.sum())


def reference_gptq(
    weight,
    hessian,
    bits: int,
    group_size: int,
    symmetric: bool,
    actorder: str,
    damp: float = 0.01,
    scale_dtype=np.float32,
    tie_hint=None,
    tie_tol: float = 1e-3,
) -> ReferenceResult:
    """GPTQ of `weight` (rows, columns) under Hessian `hessian` (columns, columns).

    `tie_hint`: optional codes (original column order) of the implementation under test, used
    only to break near-ties in rounding the same way (see `_quantize`); `forced_ties` in the
    result counts how often that changed a code.
    """
    W = _f64(weight)
    H = _f64(hessian)
    hint_codes = None if tie_hint is None else _f64(tie_hint)
    rows, columns = W.shape
    size = columns if group_size == -1 else group_size

    for c in range(columns):
        if H[c, c] == 0:
            H[c, c] = 1.0
            W[:, c] = 0.0

    if actorder == "none":
        order = list(range(columns))
    elif actorder in ("static", "dynamic"):
        # Python's sort is stable: equal diagonals keep their original left-to-right order.
        order = sorted(range(columns), key=lambda c: -H[c, c])
    else:
        raise ValueError(f"unknown actorder {actorder!r}")

    # Group of each original column, and the columns each group holds.
    g_idx = np.zeros(columns, dtype=np.int64)
    if actorder == "dynamic":
        for position, c in enumerate(order):
            g_idx[c] = position // size
    else:
        g_idx[:] = np.arange(columns) // size
    groups = int(g_idx.max()) + 1
    members = [np.flatnonzero(g_idx == g) for g in range(groups)]

    scale = np.zeros((rows, groups))
    zero = np.zeros((rows, groups))
    have_params = [False] * groups
    if actorder == "static":
        for g in range(groups):
            scale[:, g], zero[:, g] = minmax_params(W[:, members[g]], bits, symmetric, scale_dtype)
            have_params[g] = True

    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(columns))

    codes = np.zeros((rows, columns))
    Q = np.zeros((rows, columns))
    remaining = np.ones(columns)  # 1.0 until the column is solved
    forced = 0
    for i in order:
        g = g_idx[i]
        if not have_params[g]:
            # The first column of this group to be solved: params from the current weights.
            scale[:, g], zero[:, g] = minmax_params(W[:, members[g]], bits, symmetric, scale_dtype)
            have_params[g] = True
        w = W[:, i].copy()
        hint = None if hint_codes is None else hint_codes[:, i]
        q, n = _quantize(w, scale[:, g], zero[:, g], bits, hint, tie_tol)
        forced += n
        codes[:, i] = q
        Q[:, i] = (q - zero[:, g]) * scale[:, g]
        remaining[i] = 0.0
        pivot = Hinv[i, i]
        err = (w - Q[:, i]) / pivot
        # OBS update of the columns not yet solved: W[:, j] -= err * Hinv[i, j].
        W -= np.outer(err, Hinv[i] * remaining)
        W[:, i] = Q[:, i]
        # Eliminate column i: Hinv becomes the inverse of H restricted to the columns still to
        # be solved (zeros elsewhere), which is what the next column's update must use.
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / pivot

    return ReferenceResult(
        codes=codes.astype(np.int64),
        scale=scale,
        zero=zero,
        g_idx=g_idx,
        dequantized=Q,
        order=order,
        forced_ties=forced,
    )
