"""Concurrent GPTQ solves (`pipeline.solve_threads`): the same results as solving one by one."""

from __future__ import annotations

import torch

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.quant.grid import QuantScheme
from test_calibration import SAMPLES, tiny_llama


def test_solve_threads_give_identical_results_in_the_same_order():
    runs = {}
    for threads in (1, 3):
        gptq = GPTQCallback(GPTQSettings(scheme=QuantScheme(4, 16, True, "static"), solve_threads=threads))
        CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2, callbacks=[gptq]).run()
        runs[threads] = gptq
    one, three = runs[1], runs[3]
    assert list(one.quantized) == list(three.quantized) == list(three.stats)
    assert len(one.quantized) == 3 * 7
    for name, qw in one.quantized.items():
        assert torch.equal(qw.codes, three.quantized[name].codes), name
        assert torch.equal(qw.scale, three.quantized[name].scale), name
        assert one.stats[name]["loss"] == three.stats[name]["loss"], name
