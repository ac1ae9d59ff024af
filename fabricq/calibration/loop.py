"""The sequential calibration loop: one decoder layer at a time, with hooks for callbacks.

For each layer the loop forwards every batch of cached hidden states through it (callbacks observe
the Linear inputs), lets callbacks change the layer at `on_layer_end` (GPTQ replaces weights), and
forwards again so the next layer sees the outputs of the *quantized* layer (error propagation).
When callbacks name gates for a layer, its one forward is gated instead (`fabricq.calibration.gated`):
it observes the inputs and already yields the quantized layer's outputs.

Only the current layer (and the next one, while it is prefetched) is on the compute device; hidden
states live in an `ActivationCache` (device, host, disk within budgets).
"""

from __future__ import annotations

import torch
from torch import nn

from fabricq.calibration.cache import ActivationCache, Stage
from fabricq.calibration.gated import GatedForward, layer_output
from fabricq.calibration.transfer import Prefetcher, TransferStream
from fabricq.models import decoder_layers, layer_prefix
from fabricq.sysmem import drop_mapped_pages


class _StopForward(Exception):
    pass


class StopLayerForward(Exception):
    """Raised by a callback's hook inside a calibration forward once it has observed all it
    needs from the batch: the rest of the layer is skipped and that batch's output is recomputed
    by the error-propagation pass, which then always runs."""


def _share_equal(value, previous):
    """`value` with every tensor equal to the one at the same place in `previous` replaced by it:
    position embeddings and masks are the same for equal-shaped batches, so they are kept once."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        same = value.shape == previous.shape and value.dtype == previous.dtype and value.device == previous.device
        return previous if same and torch.equal(value, previous) else value
    if isinstance(value, (tuple, list)) and isinstance(previous, type(value)) and len(value) == len(previous):
        return type(value)(_share_equal(v, p) for v, p in zip(value, previous))
    return value


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches, device, sink=None,
                               masks=None) -> list[dict]:
    """Run the model up to its first decoder layer for each batch: pass that layer's hidden states
    to `sink` (if given) and return its keyword arguments (position embeddings, masks) per batch.
    `masks`: an attention mask per batch (1 = token, 0 = padding), or None."""
    kwargs_per_batch: list[dict] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if sink is not None:
            sink(hidden)
        if kwargs_per_batch:
            previous = kwargs_per_batch[-1]
            kwargs = {k: _share_equal(v, previous.get(k)) for k, v in kwargs.items()}
        kwargs_per_batch.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b, batch in enumerate(batches):
            mask = None if masks is None else masks[b].to(device)
            try:
                model(input_ids=batch.to(device), attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return kwargs_per_batch


class CalibrationLoop:
    """Drives layer-by-layer calibration of `model` on `samples` (num_samples, seq_len).

    `cache`: where hidden states live between layers (default: unlimited memory). The next
    layer's weights are copied to the compute device while the current one runs. `attention_mask`
    (num_samples, seq_len), 1 = token, 0 = padding: padded positions are masked in the forwards,
    and `token_masks` (per batch) lets observers leave them out."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, *, device, batch_size: int, callbacks,
                 cache: ActivationCache | None = None, attention_mask: torch.Tensor | None = None):
        self.model = model
        self.samples = samples
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.callbacks = list(callbacks)
        self.layers = decoder_layers(model)
        self.prefix = layer_prefix(model, self.layers)
        self.num_layers = len(self.layers)
        self.cache = cache if cache is not None else ActivationCache(self.device)
        self.transfer = TransferStream(self.device)
        self.gated = GatedForward(self.device)
        self.kwargs: list[dict] = []
        # On the device once: observers index every module input of every batch with them.
        self.token_masks = (None if attention_mask is None
                            else [m.bool().to(self.device) for m in attention_mask.split(batch_size)])

    def layer_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def _fire(self, hook: str, *args):
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks]

    @torch.no_grad()
    def _forward(self, layer: nn.Module, inputs: Stage, index: int, observe: bool, outputs: Stage | None) -> None:
        for b, (hidden, kwargs) in enumerate(zip(inputs, self.kwargs)):
            try:
                out = layer_output(layer(hidden, **kwargs))
            except StopLayerForward:  # a callback saw all it needed; this output is not used
                out = None
            if outputs is not None:
                outputs.append(out)
            if observe:
                self._fire("on_batch_end", index, b)

    @torch.no_grad()
    def capture(self, keep_hidden: bool = True) -> Stage | None:
        """The first layer's inputs into the cache (and its per-batch kwargs into `self.kwargs`).
        With keep_hidden=False only the kwargs are rebuilt (a resumed run has its hidden states)."""
        home = next(self.layers.parameters()).device
        stage = self.cache.new_stage() if keep_hidden else None
        # Only the small parts outside the decoder layers (embeddings, rotary tables) go to the
        # compute device to produce the first layer's inputs.
        self._move_outside_layers(self.device)
        try:
            self.kwargs = capture_first_layer_inputs(
                self.model, self.layers, self.samples.split(self.batch_size), self.device,
                sink=stage.append if stage is not None else None, masks=self.token_masks,
            )
        finally:
            self._move_outside_layers(home)
        # The embeddings (often the largest tensor) are not read again until export or evaluation:
        # their pages leave resident memory (re-read from the file if touched; a changed page stays).
        drop_mapped_pages(self._outside_parameters(), keep_written=True)
        return stage

    @torch.no_grad()
    def run(self, start_layer: int = 0, inputs: Stage | None = None) -> None:
        """Calibrate layers `start_layer`… in order. A resumed run passes the layer to continue
        from and the hidden states entering it (earlier layers must already be final)."""
        observe = any(cb.needs_activations for cb in self.callbacks)
        if observe and start_layer < self.num_layers:
            if start_layer == 0:
                inputs = self.capture()
            else:
                self.capture(keep_hidden=False)
                if inputs is None or len(inputs) != len(self.kwargs):
                    raise ValueError(f"resuming at layer {start_layer} needs the hidden states of every batch")
        self._fire("on_run_start")
        home = next(self.layers.parameters()).device
        layer_loader = Prefetcher("fabricq-layer")
        last = self.num_layers - 1
        pending = layer_loader.submit(lambda: self.transfer.module_to_device(self.layers[start_layer])) \
            if start_layer <= last else None
        try:
            for index in range(start_layer, self.num_layers):
                self.transfer.wait_all(pending.result())
                if index < last:  # the next layer's weights travel while this one computes
                    pending = layer_loader.submit(lambda i=index + 1: self.transfer.module_to_device(self.layers[i]))
                inputs = self._calibrate_layer(index, inputs, observe)
                self.layers[index].to(home)
                self._fire("on_layer_complete", index, inputs)
        finally:
            layer_loader.close()
            if inputs is not None:
                inputs.release()
        self._fire("on_run_end")

    def _calibrate_layer(self, index: int, inputs: Stage | None, observe: bool) -> Stage | None:
        """Layer `index` observed, changed by the callbacks, and forwarded: the next layer's inputs
        (None after the last layer, or when nothing observes). Releases `inputs`."""
        layer, last = self.layers[index], self.num_layers - 1
        self._fire("on_layer_start", index, layer)
        outputs = None
        gates = [g for gates in self._fire("gates", index, layer) for g in gates] if observe else []
        release = bool(gates) and not any(cb.changes_layer_after_gates for cb in self.callbacks)
        try:
            if gates:  # one forward: it observes and already yields the quantized layer's outputs
                outputs = self.cache.new_stage() if index < last else None
                self.gated.run(layer, self.layer_name(index), inputs, self.kwargs, gates,
                               on_gate=lambda name: self._fire("on_gate", index, layer, name),
                               on_batch_end=lambda b: self._fire("on_batch_end", index, b),
                               outputs=outputs, release_inputs=release)
            elif observe:
                self._forward(layer, inputs, index, observe=True, outputs=None)
            changed = any(self._fire("on_layer_end", index, layer))
            if release and changed:
                raise RuntimeError(f"a callback changed {self.layer_name(index)} after its gates, but every "
                                   "callback declared changes_layer_after_gates=False (its inputs are gone)")
            if observe and index < last and (not gates or changed):
                # Error propagation: the next layer sees this (now final) layer's outputs.
                if outputs is not None:
                    outputs.release()
                outputs = self.cache.new_stage()
                self._forward(layer, inputs, index, observe=False, outputs=outputs)
        except BaseException:
            if outputs is not None:
                outputs.release()
            raise
        finally:
            if inputs is not None:
                inputs.release()
        return outputs

    def _outside_parameters(self) -> list[torch.Tensor]:
        inside = {id(m) for m in self.layers.modules()}
        return [p for m in self.model.modules() if id(m) not in inside for p in m.parameters(recurse=False)]

    def _move_outside_layers(self, device) -> None:
        inside = {id(m) for m in self.layers.modules()}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(device)
