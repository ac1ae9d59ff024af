"""Which modules of a layer share an input, known before the layer's calibration forward
(`fabricq.callbacks.hessians.learn_input_groups`): the groups the calibration forward itself
learns, nothing of the layer changed, and no answer where a module is not called."""

from __future__ import annotations

import torch
from test_calibration import SAMPLES, tiny_llama
from torch import nn

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.base import Callback
from fabricq.callbacks.hessians import SharedInputHessians, learn_input_groups
from fabricq.models import linear_modules


class Probe(Callback):
    """At each layer's start: the probe's groups; during the layer's forward: the groups that
    `SharedInputHessians` learns from the real batches (the reference)."""

    needs_activations = True

    def __init__(self, extra_module: bool = False):
        self.extra_module = extra_module
        self.probed, self.learnt, self.hooks_after_probe = {}, {}, {}

    def on_layer_start(self, loop, index, layer):
        if self.extra_module:  # a Linear the layer's forward never calls
            layer.mlp.unused = nn.Linear(4, 4)
        modules = linear_modules(layer, loop.layer_name(index))
        before = {n: p.clone() for n, p in layer.named_parameters()}
        calls = []
        other = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))  # someone else's
        self.probed[index] = learn_input_groups(loop, index, layer, modules)
        assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())
        assert calls == []  # set aside during the probe...
        self.hooks_after_probe[index] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in layer.modules())
        other.remove()
        if self.extra_module:
            del layer.mlp.unused
            modules = linear_modules(layer, loop.layer_name(index))
        self.hessians = SharedInputHessians(modules, torch.float64, stop_early=False)

    def on_batch_end(self, loop, index, batch):
        self.hessians.end_batch()

    def on_layer_end(self, loop, index, layer):
        self.hessians.remove()
        cut = len(loop.layer_name(index)) + 1
        self.learnt[index] = [[n[cut:] for n in group] for group in self.hessians.groups()]
        return False


def test_the_probe_finds_the_groups_the_calibration_forward_learns():
    probe = Probe()
    CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2, callbacks=[probe]).run()
    assert probe.probed == probe.learnt
    assert probe.probed[0] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert set(probe.hooks_after_probe.values()) == {1}  # ...and back after it; the probe's own are gone


def test_no_groups_when_a_module_is_not_called():
    probe = Probe(extra_module=True)
    CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2, callbacks=[probe]).run()
    assert set(probe.probed.values()) == {None}
    assert probe.learnt[0][0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
