"""The lagged pipeline (`lag=1`): layer i is solved on a worker thread while layer i+1 is calibrated
on layer i's unquantized outputs — so every layer is quantized on the original model's activations."""

from __future__ import annotations

import threading

import pytest
import torch

from fabricq.callbacks.base import Callback

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.models import linear_modules
from fabricq.quant.gptq import gptq_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.quant.hessian import HessianAccumulator
from test_calibration import SAMPLES, tiny_llama

SCHEME = QuantScheme(4, 16, True, "static")
BATCH = 2


def reference_without_propagation(model) -> dict[str, torch.Tensor]:
    """GPTQ of every Linear on the inputs it sees in the *unquantized* model (one full forward per
    batch with a hook per module, nothing shared with fabricq's loop but the solver)."""
    modules = {n: m for i, layer in enumerate(model.model.layers)
               for n, m in linear_modules(layer, f"model.layers.{i}").items()}
    accumulators = {n: HessianAccumulator(m.in_features, torch.float64) for n, m in modules.items()}
    handles = [m.register_forward_pre_hook(lambda m, args, n=n: accumulators[n].add(args[0]))
               for n, m in modules.items()]
    with torch.no_grad():
        for batch in SAMPLES.split(BATCH):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: gptq_quantize(m.weight.data, accumulators[n].mean(), SCHEME, block_size=8).codes
            for n, m in modules.items()}


def run(lag: int, callbacks=()) -> GPTQCallback:
    gptq = GPTQCallback(GPTQSettings(scheme=SCHEME, block_size=8, hessian_dtype=torch.float64))
    CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=BATCH, callbacks=[gptq, *callbacks],
                    lag=lag).run()
    return gptq


def test_lag_quantizes_every_layer_on_the_unquantized_models_activations():
    expected = reference_without_propagation(tiny_llama())
    lagged = run(lag=1)
    assert lagged.quantized.keys() == expected.keys()
    for name, codes in expected.items():
        assert torch.equal(lagged.quantized[name].codes, codes), name
    # The price: without a lag, layers after the first see the quantized layers' outputs instead.
    in_step = run(lag=0)
    first = [n for n in expected if n.startswith("model.layers.0.")]
    later = [n for n in expected if not n.startswith("model.layers.0.")]
    assert all(torch.equal(in_step.quantized[n].codes, lagged.quantized[n].codes) for n in first)
    assert not all(torch.equal(in_step.quantized[n].codes, lagged.quantized[n].codes) for n in later)


class Events(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_layer_start(self, loop, index, layer):
        self.events.append(("start", index))

    def on_layer_end(self, loop, index, layer):
        self.events.append(("end", index, threading.current_thread().name, torch.is_grad_enabled()))
        return False

    def on_layer_complete(self, loop, index, next_inputs):
        self.events.append(("complete", index, None if next_inputs is None else len(next_inputs)))


def test_a_layer_is_solved_on_the_worker_while_the_next_one_starts():
    events = Events()
    run(lag=1, callbacks=[events])
    log = events.events
    layers = 3
    batches = len(SAMPLES.split(BATCH))
    ends = [e for e in log if e[0] == "end"]
    assert [e[1] for e in ends] == list(range(layers))
    assert all(e[2].startswith("fabricq-lag") and e[3] is False for e in ends)  # worker, no autograd
    completes = [e for e in log if e[0] == "complete"]
    assert completes == [("complete", 0, batches), ("complete", 1, batches), ("complete", 2, None)]
    for index in range(layers - 1):  # layer i is complete only after layer i+1 has started
        assert log.index(("start", index + 1)) < log.index(completes[index])


class FailOnLayer1(Callback):
    def on_layer_end(self, loop, index, layer):
        if index == 1:
            raise RuntimeError("solve of layer 1 failed")
        return False


def test_an_error_on_the_worker_stops_the_run_and_leaves_no_thread():
    events = Events()
    with pytest.raises(RuntimeError, match="solve of layer 1 failed"):
        run(lag=1, callbacks=[FailOnLayer1(), events])
    assert ("complete", 1, len(SAMPLES.split(BATCH))) not in events.events  # never passed off as done
    assert not [t for t in threading.enumerate() if t.name.startswith("fabricq-lag")]


def test_lag_must_be_0_or_1():
    with pytest.raises(ValueError, match="lag must be 0 or 1"):
        CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=BATCH, callbacks=[], lag=2)
