"""One Hessian preparation shared by the modules reading the same input (q/k/v, gate/up) gives,
bit for bit, what solving each module alone gives: the pure functions, and a layer's solve step
by GPTQCallback's LocalSolver (sequential and threaded) against a per-module `gptq_quantize` with
the old statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fabricq.callbacks.solver as solver_module
from fabricq.callbacks.gptq import GPTQCallback
from fabricq.callbacks.solver import GPTQSettings, LayerState
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.quant.gptq import gptq_quantize, gptq_solve, layer_objectives, prepare_hessian, rtn_quantize
from fabricq.quant.grid import QuantScheme

COLS = 96


def correlated_inputs(tokens: int, cols: int, seed: int, dead=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) + 0.5)
    x[:, list(dead)] = 0.0
    return x


def assert_same(got, want):
    for part in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(got, part), getattr(want, part)), part
    assert got.info == want.info


@pytest.mark.parametrize("actorder", ["none", "static", "dynamic"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_shared_preparation_equals_each_module_alone(actorder, symmetric):
    x = correlated_inputs(4 * COLS, COLS, 0, dead=(5, 40))
    hessian = x.T @ x / x.shape[0]
    scheme = QuantScheme(4, 32, symmetric, actorder)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(rows, COLS, generator=g) * 0.05 for rows in (48, 16, 16)]
    prepared = prepare_hessian(hessian, actorder)
    assert prepared.upper is not None and prepared.dead.sum() == 2
    for weight in weights:
        alone = gptq_quantize(weight, hessian, scheme, block_size=40)
        shared = gptq_solve(weight, prepared, scheme, block_size=40)
        assert_same(shared, alone)
    # The preparation is not changed by a solve (the next module reads it too).
    again = prepare_hessian(hessian, actorder)
    assert torch.equal(again.upper, prepared.upper) and torch.equal(again.perm, prepared.perm)


def test_shared_fallback_warns_for_each_module_and_equals_alone():
    hessian = -torch.eye(COLS)  # negative definite: no damping helps
    scheme = QuantScheme(4, 32, False, "static")
    prepared = prepare_hessian(hessian, scheme.actorder)
    assert prepared.upper is None
    g = torch.Generator().manual_seed(2)
    for name in ("layers.0.q_proj", "layers.0.k_proj"):
        weight = torch.randn(8, COLS, generator=g)
        with pytest.warns(RuntimeWarning, match=rf"{name}: .*not positive definite even with damp=10\b"):
            shared = gptq_solve(weight, prepared, scheme, name=name)
        with pytest.warns(RuntimeWarning, match=rf"{name}: .*not positive definite even with damp=10\b"):
            alone = gptq_quantize(weight, hessian, scheme, name=name)
        assert_same(shared, alone)


def test_preparation_for_another_actorder_is_refused():
    prepared = prepare_hessian(torch.eye(COLS), "static")
    with pytest.raises(ValueError, match="actorder"):
        gptq_solve(torch.zeros(4, COLS), prepared, QuantScheme(4, 32, True, "dynamic"))


def _layer(seed: int) -> tuple[dict[str, nn.Linear], list[torch.Tensor]]:
    torch.manual_seed(seed)
    modules = {
        "q": nn.Linear(COLS, 64, bias=False), "k": nn.Linear(COLS, 32, bias=False),
        "v": nn.Linear(COLS, 32, bias=False), "o": nn.Linear(64, COLS, bias=False),
    }
    batches = [correlated_inputs(128, COLS, 10 + b, dead=(7,)) for b in range(3)]
    return modules, batches


def _calibrate(modules, batches) -> SharedInputHessians:
    hessians = SharedInputHessians(modules, torch.float32, stop_early=False)
    with torch.no_grad():
        for x in batches:
            for name in ("q", "k", "v"):
                modules[name](x)
            modules["o"](torch.tanh(x[:, :64]))
            hessians.end_batch()
    return hessians


@pytest.mark.parametrize("solve_threads", [1, 2])
def test_layer_solve_prepares_each_group_once_and_matches_per_module_solves(solve_threads, monkeypatch):
    modules, batches = _layer(3)
    originals = {n: m.weight.detach().clone() for n, m in modules.items()}
    hessians = _calibrate(modules, batches)
    assert hessians.groups() == [["q", "k", "v"], ["o"]]
    settings = GPTQSettings(scheme=QuantScheme(4, 32, False, "static"), block_size=32, solve_threads=solve_threads)

    calls, solves = [], []
    real_prepare, real_solve = solver_module.prepare_hessian, solver_module.gptq_solve
    monkeypatch.setattr(solver_module, "prepare_hessian", lambda h, *a, **k: calls.append(h.shape) or real_prepare(h, *a, **k))
    monkeypatch.setattr(solver_module, "gptq_solve", lambda w, *a, **k: solves.append(tuple(w.shape)) or real_solve(w, *a, **k))
    callback = GPTQCallback(settings)
    quantizer = callback.solver.quantizer
    callback.solve_step(LayerState(0, modules, hessians), hessians.groups())
    callback.close()
    assert sorted(calls) == [(64, 64), (COLS, COLS)]  # once per shared-input group
    assert sorted(solves) == [(COLS, 64), (64 + 32 + 32, COLS)]  # q, k, v solved stacked, in one column loop
    assert quantizer.prepared_groups == 0  # freed once every member had it
    assert list(callback.quantized) == list(callback.stats) == ["q", "k", "v", "o"]  # module order, threads or not
    # Each module's result owns its tensors (a checkpoint writer refuses shared memory).
    q, k = callback.quantized["q"], callback.quantized["k"]
    for part in ("packed_codes", "scale", "zero", "g_idx"):
        assert getattr(q, part).untyped_storage().data_ptr() != getattr(k, part).untyped_storage().data_ptr(), part

    for name, module in modules.items():
        # main's per-module path: its own preparation, its own statistics
        h = hessians.hessian(name)
        scheme = quantizer.scheme_for(module.in_features)
        alone = gptq_quantize(originals[name], h, scheme, block_size=32, damp=settings.damp, name=name)
        assert_same(callback.quantized[name], alone)
        assert torch.equal(module.weight.data, alone.dequantize())
        rtn = rtn_quantize(originals[name], scheme).dequantize()
        loss, rtn_loss = layer_objectives(originals[name], [alone.dequantize(), rtn], h)
        assert callback.stats[name]["loss"] == loss and callback.stats[name]["rtn_loss"] == rtn_loss
        assert callback.stats[name]["tokens"] == 3 * 128


def test_groups_over_the_stacking_limit_are_solved_in_batches_with_the_same_results(monkeypatch):
    modules, batches = _layer(4)
    originals = {n: m.weight.detach().clone() for n, m in modules.items()}
    hessians = _calibrate(modules, batches)
    settings = GPTQSettings(scheme=QuantScheme(4, 32, True, "static"), block_size=32)
    solves = []
    real_solve = solver_module.gptq_solve
    monkeypatch.setattr(solver_module, "gptq_solve", lambda w, *a, **k: solves.append(tuple(w.shape)) or real_solve(w, *a, **k))
    monkeypatch.setattr(solver_module, "STACKED_SOLVE_ELEMENTS", (64 + 32) * COLS)  # q and k fit, v does not
    callback = GPTQCallback(settings)
    callback.solve_step(LayerState(0, modules, hessians), hessians.groups())
    assert solves == [(64 + 32, COLS), (32, COLS), (COLS, 64)]
    for name in ("q", "k", "v"):
        scheme = callback.solver.quantizer.scheme_for(modules[name].in_features)
        alone = gptq_quantize(originals[name], hessians.hessian(name), scheme,
                              block_size=32, damp=settings.damp, name=name)
        assert_same(callback.quantized[name], alone)


def test_modules_of_another_dtype_are_not_stacked_with_the_others(monkeypatch):
    modules, batches = _layer(5)
    hessians = _calibrate(modules, batches)
    solves = []
    real_solve = solver_module.gptq_solve
    monkeypatch.setattr(solver_module, "gptq_solve", lambda w, *a, **k: solves.append((tuple(w.shape), w.dtype)) or real_solve(w, *a, **k))
    settings = GPTQSettings(scheme=QuantScheme(4, 32, True, "static"), block_size=32)
    quantizer = solver_module.GroupQuantizer(settings)
    weights = [modules["q"].weight.data, modules["k"].weight.data.double(), modules["v"].weight.data.double()]
    solved = quantizer.solve(["q", "k", "v"], weights, hessians)
    assert solves == [((64, COLS), torch.float32), ((64, COLS), torch.float64)]  # q alone; k and v stacked
    for name, weight, (result, _, _) in zip(["q", "k", "v"], weights, solved):
        alone = gptq_quantize(weight, hessians.hessian(name), quantizer.scheme_for(COLS), block_size=32,
                              damp=settings.damp, scale_dtype=weight.dtype, name=name)
        assert_same(result, alone)
