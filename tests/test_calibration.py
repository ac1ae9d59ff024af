"""The calibration loop: hook order, error propagation, and shared-input Hessians."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fabricq.callbacks.base import Callback

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.models import linear_modules


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


SAMPLES = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(1))


class Recorder(Callback):
    """Records hooks, and halves every weight of a layer at its end, like a quantizer would."""

    needs_activations = True

    def __init__(self):
        self.events, self.layer_inputs, self.hessians = [], {}, {}

    def on_run_start(self, loop):
        self.events.append("run_start")

    def on_layer_start(self, loop, index, layer):
        self.events.append(f"start{index}")
        self.layer_inputs[index] = []
        self._handle = layer.register_forward_pre_hook(lambda m, a, k: self.layer_inputs[index].append(a[0].clone()), with_kwargs=True)
        self._hessians = SharedInputHessians(linear_modules(layer, loop.layer_name(index)), torch.float64)

    def on_batch_end(self, loop, index, batch):
        self.events.append(f"batch{index}.{batch}")
        self._hessians.end_batch()

    def on_layer_end(self, loop, index, layer):
        self.events.append(f"end{index}")
        self._handle.remove()
        self._hessians.remove()
        self.hessians[index] = self._hessians
        for p in layer.parameters():
            p.data.mul_(0.5)
        return True

    def on_run_end(self, loop):
        self.events.append("run_end")


def test_hooks_order_and_error_propagation():
    model = tiny_llama()
    recorder = Recorder()
    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[recorder]).run()
    batches = [f"batch{i}.{b}" for i in range(3) for b in range(3)]
    assert recorder.events == ["run_start", "start0", *batches[0:3], "end0", "start1", *batches[3:6],
                               "end1", "start2", *batches[6:9], "end2", "run_end"]
    # Layer 2 must have been calibrated on the outputs of the already-changed layers 0 and 1:
    # the same inputs the changed model feeds layer 2 in an ordinary forward pass.
    seen = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, a, k: seen.append(a[0]), with_kwargs=True)
    with torch.no_grad():
        for batch in SAMPLES.split(2):
            model(input_ids=batch)
    handle.remove()
    observed = [x for x in recorder.layer_inputs[2]]
    assert len(observed) == 3
    for a, b in zip(observed, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_shared_input_hessians_four_per_llama_layer():
    model = tiny_llama()
    recorder = Recorder()
    inputs: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].clone()))
               for n, m in linear_modules(model.model.layers[0], "model.layers.0").items()]
    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[recorder]).run()
    for h in handles:
        h.remove()
    hessians = recorder.hessians[0]
    short = sorted(sorted(n.split(".")[-1] for n in g) for g in hessians.groups())
    assert short == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert len(hessians.accumulators) == 4
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        # First calibration pass only (the second, propagation pass is not observed).
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name][:3]]).double()
        torch.testing.assert_close(hessians.hessian(name), x.T @ x / x.shape[0])
        assert hessians.accumulators[hessians.leader[name]].tokens == 5 * 16
