"""EoRA: the closed-form adapter start that best approximates each module's quantization error in
the activation-weighted norm.

For a module with weight W, quantized weight W_q and input Hessian H = XᵀX (the same H GPTQ
minimises tr((W − Q)·H·(W − Q)ᵀ) under), the rank-r correction minimising
‖(E − E_r)·H^{1/2}‖_F, E = W − W_q, is E_r = [E·H^{1/2}]_r·H^{-1/2} ([·]_r: truncated SVD, by
Eckart–Young since H^{1/2} is invertible once damped). Any factor S with S·Sᵀ = H gives the same
norm (‖X·S‖² = tr(X·H·Xᵀ)), hence the same E_r: the lower Cholesky factor L is used, one
factorisation per shared-input group (q/k/v, gate/up) instead of an eigendecomposition, and the
back-mapping is a triangular solve. The factors are split evenly, B = U_r·√Σ_r, A = √Σ_r·V_rᵀ·L⁻¹,
each over √s so that s·B·A = E_r.

`initialize` computes H for every target module from calibration windows with the quantized
model, one decoder layer at a time (only that layer's Hessians exist at once), and sets each
adapter to its EoRA start.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.calibration.gated import layer_output
from fabricq.calibration.loop import capture_first_layer_inputs
from fabricq.models import decoder_layers, layer_prefix

log = logging.getLogger("fabricq")


def hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of H + λI (λ = damp · mean diag H, GPTQ's damping), float64:
    L·Lᵀ = H + λI. Columns no input reached are covered by the damping."""
    h = hessian.double().clone()
    mean = float(h.diagonal().mean())
    h.diagonal().add_(damp * mean if mean > 0 else 1.0)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:  # a damping of 1% of the mean diagonal makes any PSD matrix definite
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp})")
    return lower


def eora_factors(error: torch.Tensor, factor: torch.Tensor, rank: int, scaling: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with scaling·B·A = [error·L]_rank·L⁻¹, L = `factor`."""
    e = error.double()
    m = e @ factor
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    # V_rᵀ·L⁻¹ is the X with X·L = V_rᵀ.
    back = torch.linalg.solve_triangular(factor, vh, upper=False, left=False)
    root = s.sqrt()
    a = root[:, None] * back / math.sqrt(scaling)
    b = u * root[None, :] / math.sqrt(scaling)
    return a.float(), b.float()


def weighted_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E·H·Eᵀ) in float64: the output error a weight error E causes on inputs with Hessian H."""
    e = error.detach().double()
    return float(((e @ hessian.double()) * e).sum())


@torch.no_grad()
def layerwise_hessians(model: nn.Module, modules: dict, windows: torch.Tensor, *, batch_size: int, device,
                       on_layer, reduce=None) -> None:
    """Forward calibration `windows` through `model` one decoder layer at a time and hand each
    layer's input Hessians to `on_layer(index, names, groups)`: names, the layer's entries of
    `modules`; groups, (module names sharing one input, H = mean x·xᵀ float64) per shared input
    (q/k/v, gate/up). Only one layer's Hessians exist at once. When `on_layer` returns True it
    has changed the layer's weights, and the layer is forwarded again so the next layer sees the
    changed layer's outputs (true-sequential, as GPTQ). reduce: called on each Hessian sum and
    token count before use (several ranks add their shares; None on one rank)."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    hidden: list[torch.Tensor] = []
    batches = list(windows.split(batch_size)) if len(windows) else []
    kwargs = capture_first_layer_inputs(model, layers, batches, device, sink=hidden.append)
    for index, layer in enumerate(layers):
        names = [n for n in modules if n.startswith(f"{prefix}.{index}.")]
        observer = SharedInputHessians({n: modules[n] for n in names}, torch.float32, stop_early=False) if names else None
        outputs = []
        for h, kw in zip(hidden, kwargs):
            outputs.append(layer_output(layer(h, **kw)))
            if observer is not None:
                observer.end_batch()
        if observer is not None:
            observer.remove()
            groups = []
            for group in observer.groups():
                accumulator = observer.accumulators[group[0]]
                total, tokens = accumulator.sum.double(), accumulator.tokens
                if reduce is not None:
                    total, tokens = reduce(total, tokens)
                groups.append((list(group), total / max(tokens, 1)))
            del observer
            if on_layer(index, names, groups):
                outputs = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
        hidden = outputs


@torch.no_grad()
def initialize(model: nn.Module, modules: dict, original: dict[str, torch.Tensor], windows: torch.Tensor, *,
               batch_size: int, device, damp: float = 0.01, reduce=None, release=None) -> dict:
    """Set every adapter in `modules` (name → LoRALinear) to its EoRA start.

    original: name → the unquantized weight (W; E = W − dequant(W_q)). windows: calibration token
    windows (num, seq_len). reduce: as in `layerwise_hessians`; each layer's entries are removed
    from `original` once used, and passed to `release` (e.g. to drop their memory-mapped pages).
    Returns per-module {error_before, error_after}: tr(E·H·Eᵀ) without and with the start, on the
    damped-free H of these windows."""
    stats: dict[str, dict] = {}
    tick = time.perf_counter()
    layers = len(decoder_layers(model))

    def start_layer(index: int, names: list[str], groups) -> bool:
        for group, hessian in groups:
            factor = hessian_factor(hessian, damp)
            for name in group:
                module = modules[name]
                error = original[name].double() - module.base_weight(torch.float64)
                a, b = eora_factors(error, factor, module.rank, module.scaling)
                module.set_adapter(a, b)
                stats[name] = {"error_before": weighted_error(error, hessian),
                               "error_after": weighted_error(error - module.delta_weight().double(), hessian)}
        done = [original.pop(n) for n in names]  # not needed again: references dropped as we go
        if release is not None:
            release(done)
        log.info("EoRA start: layer %d/%d · %.1f s", index + 1, layers, time.perf_counter() - tick)
        return False  # the next layer's Hessians stay those of the quantized base's activations

    layerwise_hessians(model, modules, windows, batch_size=batch_size, device=device, on_layer=start_layer,
                       reduce=reduce)
    return stats
