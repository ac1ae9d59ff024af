"""Skipping the tail of a calibration forward (`StopLayerForward`) changes no result."""

from __future__ import annotations

import torch

import fabricq.callbacks.gptq as gptq_callback
from fabricq.callbacks.base import Callback
from fabricq.calibration.loop import CalibrationLoop, StopLayerForward
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.quant.grid import QuantScheme
from test_calibration import SAMPLES, tiny_llama


SHARED_INPUT_HESSIANS = gptq_callback.SharedInputHessians


def _gptq_run(monkeypatch, stop_early: bool):
    monkeypatch.setattr(gptq_callback, "SharedInputHessians",
                        lambda *args, **kwargs: SHARED_INPUT_HESSIANS(*args, **{**kwargs, "stop_early": stop_early}))
    model = tiny_llama()
    gptq = GPTQCallback(GPTQSettings(scheme=QuantScheme(4, 16, True, "static")))
    calls = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(1))
    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[gptq]).run()
    handle.remove()
    monkeypatch.undo()
    return gptq, len(calls)


def test_early_stop_gives_identical_quantization(monkeypatch):
    full, full_calls = _gptq_run(monkeypatch, stop_early=False)
    early, early_calls = _gptq_run(monkeypatch, stop_early=True)
    batches = -(-SAMPLES.shape[0] // 2)
    # Without the stop: every batch twice (calibration, propagation). With it: only the first
    # calibration batch reaches down_proj, then the propagation pass.
    assert full_calls == 2 * batches and early_calls == 1 + batches
    assert full.quantized.keys() == early.quantized.keys()
    for name, q in full.quantized.items():
        assert torch.equal(q.codes, early.quantized[name].codes), name
        assert torch.equal(q.scale, early.quantized[name].scale), name
        assert full.stats[name]["loss"] == early.stats[name]["loss"], name


class StopsWithoutChanging(Callback):
    """Observes only q_proj's input, stops every forward there, and changes nothing."""

    needs_activations = True

    def on_layer_start(self, loop, index, layer):
        def stop(module, args):
            raise StopLayerForward

        self._handle = layer.self_attn.q_proj.register_forward_pre_hook(stop)

    def on_layer_end(self, loop, index, layer):
        self._handle.remove()
        return False


def test_stopped_batches_are_recomputed_even_if_the_layer_did_not_change():
    model = tiny_llama()
    loop = CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[StopsWithoutChanging()])
    outputs = []
    last = model.model.layers[-1]
    grab = last.register_forward_pre_hook(lambda m, a, k: outputs.append(a[0] if a else k["hidden_states"]),
                                          with_kwargs=True)
    loop.run()
    grab.remove()
    # The last layer was called with the recomputed outputs of the layer before it, batch by
    # batch; compare them with a plain forward of the same layers.
    with torch.no_grad():
        reference = model(input_ids=SAMPLES, use_cache=False, output_hidden_states=True).hidden_states[-2]
    assert len(outputs) == 3 and all(o is not None for o in outputs)  # 3 batches, stopped at q_proj
    torch.testing.assert_close(torch.cat(outputs), reference, rtol=1e-5, atol=1e-6)


def test_gptq_updates_weights_in_place():
    # The loaded weights may be a private memory map of the checkpoint: writing into them keeps
    # one resident copy, where a new tensor per module would add a second (peak RSS).
    model = tiny_llama()
    layer = model.model.layers[0]
    before = {name: m.weight.data_ptr() for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {name: m.weight.detach().clone() for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    gptq = GPTQCallback(GPTQSettings(scheme=QuantScheme(4, 16, True, "static")))
    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[gptq]).run()
    for name, m in layer.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.data_ptr() == before[name]
            assert not torch.equal(m.weight, originals[name])
            assert torch.equal(m.weight, gptq.quantized[f"model.layers.0.{name}"].dequantize())
