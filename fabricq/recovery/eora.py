"""EoRA: the closed-form adapter start that best approximates each module's quantization error in
the activation-weighted norm.

For a module with weight W, quantized weight W_q and input Hessian H = XᵀX (the same H GPTQ
minimises tr((W − Q)·H·(W − Q)ᵀ) under), the rank-r correction minimising
‖(E − E_r)·H^{1/2}‖_F, E = W − W_q, is E_r = [E·H^{1/2}]_r·H^{-1/2} ([·]_r: truncated SVD, by
Eckart–Young since H^{1/2} is invertible once damped). Any factor S with S·Sᵀ = H gives the same
norm (‖X·S‖² = tr(X·H·Xᵀ)), hence the same E_r: the lower Cholesky factor L is used, one
factorisation per shared-input group (q/k/v, gate/up) instead of an eigendecomposition, and the
back-mapping is a triangular solve. Only the r leading singular triplets are needed: they come
from the eigendecomposition of the smaller Gram matrix of E·L (`top_singular`). The factors are
split evenly, B = U_r·√Σ_r, A = √Σ_r·V_rᵀ·L⁻¹, each over √s so that s·B·A = E_r.

`initialize` computes H for every target module from calibration windows with the quantized
model, one decoder layer at a time (only that layer's Hessians exist at once), and sets each
adapter to its EoRA start. On several ranks each layer's modules are split among the ranks by
factorisation cost: a group's Hessian is summed on its owners only, each owner factorises its
modules, and at the end every owner broadcasts its starts, so every rank holds all of them. No
forward waits for a start: the next layer's Hessians are of the quantized base's activations.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from fabricq.calibration.gated import layer_output
from fabricq.calibration.loop import capture_first_layer_inputs
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.models import decoder_layers, layer_prefix
from fabricq.parallel.plan import assign_to_ranks

log = logging.getLogger("fabricq")


def damping_of(hessian: torch.Tensor, damp: float) -> float:
    """λ = damp · mean diag H (GPTQ's damping; 1 for a Hessian no input reached)."""
    mean = float(hessian.diagonal().double().mean())
    return damp * mean if mean > 0 else 1.0


def hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of H + λI (λ = `damping_of(H, damp)`), float64: L·Lᵀ = H + λI.
    Columns no input reached are covered by the damping."""
    h = hessian.double().clone()
    h.diagonal().add_(damping_of(hessian, damp))
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:  # a damping of 1% of the mean diagonal makes any PSD matrix definite
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp})")
    return lower


def top_singular(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, Σ_r, V_rᵀ) of the `rank` largest singular values of `m` (float64), from the
    eigendecomposition of its smaller Gram matrix: a full SVD of a 1536 × 576 matrix costs about
    three times as much and yields hundreds of vectors the truncation throws away. Squaring
    loses precision only for singular values near √eps·σ_max, far below the kept ones of a
    quantization error."""
    wide = m.shape[0] <= m.shape[1]
    values, vectors = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # ascending
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    s = values.clamp_min(0).sqrt()
    inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))  # directions with no error: zero factors
    if wide:
        return vectors, s, (vectors.T @ m) * inverse[:, None]
    return (m @ vectors) * inverse[None, :], s, vectors.T


def eora_factors(error: torch.Tensor, factor: torch.Tensor, rank: int, scaling: float = 1.0,
                 weighted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (rank, in), B (out, rank)) with scaling·B·A = [error·L]_rank·L⁻¹, L = `factor`;
    `weighted`: error·L when the caller has it."""
    m = error.double() @ factor if weighted is None else weighted
    u, s, vh = top_singular(m, rank)
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


def damped_weighted_error(weighted: torch.Tensor, error: torch.Tensor, damping: float) -> float:
    """tr(E·H·Eᵀ) from E·L (L·Lᵀ = H + λI, λ = `damping`): ‖E·L‖² − λ‖E‖², without a product by H."""
    return float(weighted.square().sum() - damping * error.double().square().sum())


def factorisation_cost(rows: int, cols: int, group_size: int = 1) -> float:
    """Relative cost of one module's start, in float64 flops: E·L and the residual's (L)·, the
    Gram matrix of the smaller side, its eigendecomposition (about 15·n³, against 2·n³ for a
    matrix product of that size), a share of its group's Cholesky factorisation, plus the
    element-wise passes over the weight and a fixed per-module overhead (both weighted as fitted
    to single-thread timings of the default model's shapes: small modules cost more than their
    flops say)."""
    small, large = min(rows, cols), max(rows, cols)
    flops = 4.0 * rows * cols**2 + 2.0 * small**2 * large + 15.0 * small**3 + float(cols) ** 3 / group_size
    return flops + 2.7e3 * rows * cols + 2e8


def plan_owners(groups: list[list[str]], shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Owner rank of every module of one layer's shared-input `groups` (shapes: name → (rows,
    cols)), minimising the largest rank's factorisation cost. Every rank computes the same plan."""
    costs = [factorisation_cost(*shapes[n], len(group)) for group in groups for n in group]
    return dict(zip([n for group in groups for n in group], assign_to_ranks(costs, world_size)))


@torch.no_grad()
def layerwise_hessians(model: nn.Module, modules: dict, windows: torch.Tensor, *, batch_size: int, device,
                       on_layer, reduce=None, owners=None) -> None:
    """Forward calibration `windows` through `model` one decoder layer at a time and hand each
    layer's input Hessians to `on_layer(index, names, groups)`: names, the layer's entries of
    `modules`; groups, (module names sharing one input, H = mean x·xᵀ float64) per shared input
    (q/k/v, gate/up). Only one layer's Hessians exist at once. When `on_layer` returns True it
    has changed the layer's weights, and the layer is forwarded again so the next layer sees the
    changed layer's outputs (true-sequential, as GPTQ). reduce: called on each Hessian sum and
    token count before use (several ranks add their shares; None on one rank). owners: called
    with each layer's groups, returns each module's owner rank; a group's sum then goes to its
    one owner (`reduce(total, tokens, dst=owner)`, None on the other ranks) or, when its modules
    have several owners, to all ranks; `on_layer` gets None for a group whose sum is elsewhere."""
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
            plan = owners([list(g) for g in observer.groups()]) if owners is not None else {}
            for group in observer.groups():
                accumulator = observer.accumulators[group[0]]
                total, tokens = accumulator.sum.double(), accumulator.tokens
                holders = {plan[n] for n in group} if plan else set()
                if reduce is not None and len(holders) == 1:
                    reduced = reduce(total, tokens, dst=holders.pop())
                    if reduced is None:  # summed on the owner only
                        groups.append((list(group), None))
                        continue
                    total, tokens = reduced
                elif reduce is not None:
                    total, tokens = reduce(total, tokens)
                groups.append((list(group), total / max(tokens, 1)))
            del observer
            if on_layer(index, names, groups):
                outputs = [layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
        hidden = outputs


@torch.no_grad()
def initialize(model: nn.Module, modules: dict, original: dict[str, torch.Tensor], windows: torch.Tensor, *,
               batch_size: int, device, damp: float = 0.01, reduce=None, release=None, rank: int = 0,
               world_size: int = 1) -> dict:
    """Set every adapter in `modules` (name → LoRALinear) to its EoRA start.

    original: name → the unquantized weight (W; E = W − dequant(W_q)). windows: calibration token
    windows (num, seq_len), this rank's share. reduce: as in `layerwise_hessians`, given when
    world_size > 1 (it must accept dst=); each layer's modules are then split among the ranks
    (`plan_owners`) and every rank ends with every start (`share_starts`). Each layer's entries
    are removed from `original` once used, and passed to `release` (e.g. to drop their
    memory-mapped pages). Returns per-module {error_before, error_after}: tr(E·H·Eᵀ) without and
    with the start, on the damped-free H of these windows."""
    if world_size > 1 and reduce is None:
        raise ValueError("several ranks need `reduce` to sum their Hessians")
    stats: dict[str, dict] = {}
    owner: dict[str, int] = {}
    shapes = {n: (m.out_features, m.in_features) for n, m in modules.items()}
    tick = time.perf_counter()
    layers = len(decoder_layers(model))

    def plan(groups: list[list[str]]) -> dict[str, int]:
        owner.update(plan_owners(groups, shapes, world_size))
        return owner

    def start_layer(index: int, names: list[str], groups) -> bool:
        for group, hessian in groups:
            mine = [n for n in group if owner.get(n, rank) == rank]
            if hessian is None or not mine:
                continue
            factor, damping = hessian_factor(hessian, damp), damping_of(hessian, damp)
            for name in mine:
                module = modules[name]
                error = original[name].double() - module.base_weight(torch.float64)
                weighted = error @ factor
                a, b = eora_factors(error, factor, module.rank, module.scaling, weighted=weighted)
                module.set_adapter(a, b)
                left = error - module.delta_weight().double()  # the adapter as stored (float32)
                stats[name] = {"error_before": damped_weighted_error(weighted, error, damping),
                               "error_after": damped_weighted_error(left @ factor, left, damping)}
        done = [original.pop(n) for n in names]  # not needed again: references dropped as we go
        if release is not None:
            release(done)
        log.info("EoRA start: layer %d/%d · %.1f s", index + 1, layers, time.perf_counter() - tick)
        return False  # the next layer's Hessians stay those of the quantized base's activations

    layerwise_hessians(model, modules, windows, batch_size=batch_size, device=device, on_layer=start_layer,
                       reduce=reduce, owners=plan if world_size > 1 else None)
    if world_size > 1:
        share_starts(modules, owner, stats, rank, world_size)
    return {n: stats[n] for n in modules if n in stats}


def share_starts(modules: dict, owner: dict[str, int], stats: dict, rank: int, world_size: int) -> None:
    """Every owner broadcasts its modules' A, B and errors (one flat buffer each, in `modules`
    order, which every rank shares); the other ranks set them, so all ranks hold every start."""
    import torch.distributed as dist

    for src in range(world_size):
        names = [n for n in modules if owner.get(n) == src]
        if not names:
            continue
        params = [p for n in names for p in (modules[n].lora_A, modules[n].lora_B)]
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])
        errors = torch.zeros(len(names), 2, dtype=torch.float64, device=flat.device)
        if src == rank:
            errors.copy_(torch.tensor([[stats[n]["error_before"], stats[n]["error_after"]] for n in names],
                                      dtype=torch.float64))
        dist.broadcast(flat, src)
        dist.broadcast(errors, src)
        if src == rank:
            continue
        pieces = flat.split([p.numel() for p in params])
        for i, name in enumerate(names):
            module = modules[name]
            module.set_adapter(pieces[2 * i].view_as(module.lora_A), pieces[2 * i + 1].view_as(module.lora_B))
            stats[name] = {"error_before": float(errors[i, 0]), "error_after": float(errors[i, 1])}
