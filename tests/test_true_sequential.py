"""True-sequential GPTQ in one gated forward per layer, against a plain multi-forward reference."""

from __future__ import annotations

import threading

import pytest
import torch

from fabricq.calibration.gated import BatchCoroutine
from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.base import Callback
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.models import linear_modules
from fabricq.quant.gptq import gptq_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.quant.hessian import HessianAccumulator
from test_calibration import SAMPLES, tiny_llama

SCHEME = QuantScheme(4, 16, True, "static")
# q/k/v, then o, then gate/up, then down: each group calibrated with the groups before it quantized.
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def reference_true_sequential(model, batch_size: int) -> dict[str, torch.Tensor]:
    """The original recipe, written plainly: for every group of every layer, forward all batches
    through the partly quantized model up to that layer, sum the group's input products, quantize
    the group. One full forward per group; nothing shared with fabricq's loop but the solver."""
    codes = {}
    batches = SAMPLES.split(batch_size)
    for index, layer in enumerate(model.model.layers):
        modules = linear_modules(layer, f"model.layers.{index}")
        for group in GROUPS:
            names = [f"model.layers.{index}.{g}" for g in group]
            accumulator = None

            def observe(module, args):
                nonlocal accumulator
                x = args[0]
                if accumulator is None:
                    accumulator = HessianAccumulator(x.shape[-1], torch.float64)
                accumulator.add(x)

            handle = modules[names[0]].register_forward_pre_hook(observe)
            with torch.no_grad():
                for batch in batches:
                    model(input_ids=batch, use_cache=False)
            handle.remove()
            for name in names:
                weight = modules[name].weight.data
                result = gptq_quantize(weight, accumulator.mean(), SCHEME, block_size=8)
                weight.copy_(result.dequantize())
                codes[name] = result.codes
    return codes


def run_fabricq(true_sequential: bool, callbacks=(), batch_size: int = 2):
    model = tiny_llama()
    gptq = GPTQCallback(GPTQSettings(scheme=SCHEME, block_size=8, hessian_dtype=torch.float64,
                                     true_sequential=true_sequential))
    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=batch_size, callbacks=[gptq, *callbacks]).run()
    return model, gptq


class CountForwards(Callback):
    """Counts batches entering each layer's down_proj (once per batch per forward pass)."""

    def on_layer_start(self, loop, index, layer):
        self.calls = getattr(self, "calls", {})
        self.calls[index] = 0
        self._handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: self._count(index))

    def _count(self, index):
        self.calls[index] += 1

    def on_layer_complete(self, loop, index, next_inputs):
        self._handle.remove()


def test_gated_forward_matches_multi_forward_reference_bit_for_bit():
    reference_model = tiny_llama()
    expected = reference_true_sequential(reference_model, batch_size=2)
    model, gptq = run_fabricq(true_sequential=True)
    assert list(gptq.quantized) == list(expected)  # solved in call order, group by group
    for name, codes in expected.items():
        assert torch.equal(gptq.quantized[name].codes, codes), name
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name


def test_true_sequential_differs_from_layer_mode_and_runs_one_forward_per_layer():
    counter = CountForwards()
    _, sequential = run_fabricq(True, [counter])
    batches = -(-SAMPLES.shape[0] // 2)
    assert counter.calls == {0: batches, 1: batches, 2: batches}
    layer_counter = CountForwards()
    _, layered = run_fabricq(False, [layer_counter])
    # Layer mode: the calibration pass stops before down_proj after the first batch, then the
    # propagation pass runs every batch (the last layer needs no propagation).
    assert layer_counter.calls == {0: 1 + batches, 1: 1 + batches, 2: 1}
    # Layer 0's q/k/v read the same (unquantized) input either way; o_proj on does not.
    assert torch.equal(sequential.quantized["model.layers.0.self_attn.k_proj"].codes,
                       layered.quantized["model.layers.0.self_attn.k_proj"].codes)
    assert not torch.equal(sequential.quantized["model.layers.0.mlp.down_proj"].codes,
                           layered.quantized["model.layers.0.mlp.down_proj"].codes)


def test_groups_learnt_before_the_first_layer_gate_every_layer_once_per_group():
    gates = []

    class RecordGates(Callback):
        def on_gate(self, loop, index, layer, name):
            gates.append((index, name.split(".", 3)[-1]))

    run_fabricq(True, [RecordGates()])
    leaders = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert gates == [(i, n) for i in (0, 1, 2) for n in leaders]


def test_a_failing_gate_unwinds_every_paused_batch():
    class Fails(Callback):
        needs_activations = True

        def gates(self, loop, index, layer):
            return [f"{loop.layer_name(index)}.self_attn.o_proj"]

        def on_gate(self, loop, index, layer, name):
            raise RuntimeError("solver exploded")

    with pytest.raises(RuntimeError, match="solver exploded"):
        CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2, callbacks=[Fails()]).run()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fabricq-batch")]
    assert BatchCoroutine.current() is None


def test_coroutines_take_turns_in_order():
    log = []
    coroutines = []

    def body(i):
        for step in range(3):
            log.append((i, step))
            coroutines[i].suspend(step)
        return i * 10

    coroutines.extend(BatchCoroutine(lambda i=i: body(i)) for i in range(3))
    for step in range(3):
        assert [c.resume() for c in coroutines] == [step] * 3
    assert [c.resume() for c in coroutines] == [None] * 3
    assert [c.result for c in coroutines] == [0, 10, 20] and all(c.done for c in coroutines)
    assert log == [(i, s) for s in range(3) for i in range(3)]


class _Block(torch.nn.Module):
    """x + f(x) with an optional norm after the last projection (Gemma 2 puts one there)."""

    def __init__(self, post_norm: bool):
        super().__init__()
        torch.manual_seed(3)
        self.up, self.down = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)
        self.post_norm = torch.nn.LayerNorm(8) if post_norm else torch.nn.Identity()

    def forward(self, x):
        return x + self.post_norm(self.down(torch.relu(self.up(x))))


def test_output_adds_module_output_only_for_a_plain_last_projection():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from fabricq.calibration.gated import output_adds_module_output

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    plain, normed = _Block(post_norm=False), _Block(post_norm=True)
    assert output_adds_module_output(plain, plain.down, x, {})
    assert not output_adds_module_output(normed, normed.down, x, {})  # a norm follows it
    assert not output_adds_module_output(plain, plain.up, x, {})  # not the last one called
    layer = tiny_llama().model.layers[0]
    seen = []
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    rotary = LlamaRotaryEmbedding(tiny_llama().config)
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5))
    kwargs = {"position_embeddings": rotary(hidden, torch.arange(6)[None].expand(2, -1)), "attention_mask": None}
    assert output_adds_module_output(layer, layer.mlp.down_proj, hidden, kwargs)
    assert not output_adds_module_output(layer, layer.mlp.up_proj, hidden, kwargs)
    assert seen == []  # the layer's own hooks saw none of the probe's forwards
    assert "forward" not in layer.mlp.down_proj.__dict__
    handle.remove()


def test_batches_finish_the_layer_before_its_last_gate_is_quantized():
    """At the down_proj gate nothing is paused any more (the batches' activations are freed),
    and the layer's inputs are gone from the cache (no second forward will need them)."""
    alive, held = {}, {}

    class AtGates(Callback):
        changes_layer_after_gates = False

        def on_gate(self, loop, index, layer, name):
            threads = [t for t in threading.enumerate() if t.name.startswith("fabricq-batch")]
            if name.endswith("down_proj"):  # finished batches' threads may still be exiting
                for t in threads:
                    t.join(timeout=5)
            alive[index, name.split(".", 3)[-1]] = [t.name for t in threads if t.is_alive()]
            held[index, name.split(".", 3)[-1]] = sum(loop.cache.used.values())

    run_fabricq(True, [AtGates()])
    batches = -(-SAMPLES.shape[0] // 2)
    stage = SAMPLES.numel() * 32 * 4  # one layer's hidden states (hidden 32, float32)
    for index in range(3):
        assert alive[index, "mlp.down_proj"] == []
        assert len(alive[index, "mlp.gate_proj"]) == batches  # paused at the earlier gates
        assert held[index, "mlp.gate_proj"] == stage  # the inputs
        assert held[index, "mlp.down_proj"] == 0  # released; the outputs enter the cache after it


def test_gated_forward_without_finishing_early_matches_the_reference(monkeypatch):
    """The general path (every batch pauses at every gate, e.g. a norm after the last Linear)."""
    import fabricq.calibration.gated

    monkeypatch.setattr(fabricq.calibration.gated, "output_adds_module_output", lambda *a: False)
    expected = reference_true_sequential(tiny_llama(), batch_size=2)
    _, gptq = run_fabricq(true_sequential=True)
    for name, codes in expected.items():
        assert torch.equal(gptq.quantized[name].codes, codes), name
