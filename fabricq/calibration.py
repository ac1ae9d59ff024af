"""The sequential calibration loop: one decoder layer at a time, with hooks for callbacks.

For each layer the loop forwards every batch of cached hidden states through it (callbacks observe
the Linear inputs), lets callbacks change the layer at `on_layer_end` (GPTQ replaces weights), and,
if they did, forwards again so the next layer sees the outputs of the *quantized* layer (error
propagation). Only the current layer needs to be on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fabricq.models import decoder_layers, layer_prefix


class Callback:
    """Hooks of the calibration loop. Return True from `on_layer_end` if the layer changed.

    `needs_activations`: whether the callback observes layer inputs. When no callback does
    (round-to-nearest), the loop runs no forward pass at all."""

    needs_activations = False

    def on_run_start(self, loop: "CalibrationLoop") -> None: ...

    def on_layer_start(self, loop: "CalibrationLoop", index: int, layer: nn.Module) -> None: ...

    def on_batch_end(self, loop: "CalibrationLoop", index: int, batch: int) -> None: ...

    def on_layer_end(self, loop: "CalibrationLoop", index: int, layer: nn.Module) -> bool:
        return False

    def on_run_end(self, loop: "CalibrationLoop") -> None: ...


class _StopForward(Exception):
    pass


class StopLayerForward(Exception):
    """Raised by a callback's hook inside a calibration forward once it has observed all it
    needs from the batch: the rest of the layer is skipped and that batch's output is recomputed
    by the error-propagation pass, which then always runs."""


@dataclass
class LayerInputs:
    """What a decoder layer is called with, for each batch: hidden states and keyword arguments
    (position embeddings, masks) as the model computed them for the first layer."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches, device) -> LayerInputs:
    """Run the model up to its first decoder layer for each batch and keep that layer's inputs."""
    captured = LayerInputs()

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class CalibrationLoop:
    """Drives layer-by-layer calibration of `model` on `samples` (num_samples, seq_len)."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, *, device, batch_size: int, callbacks):
        self.model = model
        self.samples = samples
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.callbacks = list(callbacks)
        self.layers = decoder_layers(model)
        self.prefix = layer_prefix(model, self.layers)
        self.num_layers = len(self.layers)

    def layer_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def _fire(self, hook: str, *args):
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks]

    @torch.no_grad()
    def _forward(self, layer: nn.Module, inputs: LayerInputs, index: int, observe: bool) -> list[torch.Tensor]:
        outputs = []
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            try:
                outputs.append(_layer_output(layer(hidden, **kwargs)))
            except StopLayerForward:
                outputs.append(None)
            if observe:
                self._fire("on_batch_end", index, b)
        return outputs

    @torch.no_grad()
    def run(self) -> None:
        observe = any(cb.needs_activations for cb in self.callbacks)
        home = next(self.layers.parameters()).device
        inputs = None
        if observe:
            # Only the small parts outside the decoder layers (embeddings, rotary tables) go to
            # the compute device to produce the first layer's inputs.
            self._move_outside_layers(self.device)
            inputs = capture_first_layer_inputs(
                self.model, self.layers, self.samples.split(self.batch_size), self.device
            )
            self._move_outside_layers(home)

        self._fire("on_run_start")
        last = self.num_layers - 1
        for index, layer in enumerate(self.layers):
            layer.to(self.device)
            self._fire("on_layer_start", index, layer)
            outputs = self._forward(layer, inputs, index, observe=True) if observe else None
            changed = any(self._fire("on_layer_end", index, layer))
            if observe and index < last and (changed or any(o is None for o in outputs)):
                # Error propagation: the next layer sees the quantized layer's outputs.
                outputs = self._forward(layer, inputs, index, observe=False)
            inputs = LayerInputs(outputs, inputs.kwargs) if observe else None
            layer.to(home)
        self._fire("on_run_end")

    def _move_outside_layers(self, device) -> None:
        inside = {id(m) for m in self.layers.modules()}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(device)
