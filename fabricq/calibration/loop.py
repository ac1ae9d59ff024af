"""The sequential calibration loop: one decoder layer at a time, with hooks for callbacks.

For each layer the loop forwards every batch of cached hidden states through it (callbacks observe
the Linear inputs), lets callbacks change the layer at `on_layer_end` (GPTQ replaces weights), and
forwards again so the next layer sees the outputs of the *quantized* layer (error propagation).

Gated forward (one forward per layer): a callback may name modules as *gates* (`Callback.gates`).
Each batch's forward then runs as a coroutine that pauses just before a gate until every batch has
reached it; `on_gate` fires in between (GPTQ quantizes the modules reading that input), and the
batches continue through the changed module. The forward that observed the inputs thus already
produces the quantized layer's outputs, and no second pass is needed. Coroutines take turns (one
runs at a time, batches in order), so every sum is added in the same order as in a plain loop.

Lagged pipeline (`lag=1`): `on_layer_end` of layer i (the GPTQ solves) runs on a worker thread
while layer i+1 is calibrated on layer i's *unquantized* outputs, which its calibration forward
already produced. No forward is repeated and the solves overlap the next forward, at the price of
error propagation: every layer is calibrated on the original model's activations.

Only the current layer (and the next one, while it is prefetched, or the previous one, while it is
solved with a lag) is on the compute device; hidden states live in an `ActivationCache` (device,
host, disk within budgets).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from fabricq.calibration.cache import ActivationCache, Stage
from fabricq.sysmem import share_one_malloc_arena
from fabricq.models import decoder_layers, layer_prefix
from fabricq.calibration.transfer import Prefetcher, TransferStream




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
def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches, device, sink=None) -> list[dict]:
    """Run the model up to its first decoder layer for each batch: pass that layer's hidden states
    to `sink` (if given) and return its keyword arguments (position embeddings, masks) per batch."""
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
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return kwargs_per_batch


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def output_adds_module_output(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether `layer`'s output is exactly (the output with `module` returning zeros) + (the
    module's output), for this input, and `module` is the last Linear the layer calls — true of
    pre-norm decoder layers and their last projection (`residual + down_proj(·)`), false when a
    norm or scale follows it (Gemma 2's post-feed-forward norm). Runs the layer twice, with
    every hook of the layer's modules set aside, so callbacks observe nothing."""
    if not isinstance(module, nn.Linear):
        return False
    parts = list(layer.modules())
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in parts]
    calls, seen = [], {}

    def record(m, args):
        calls.append(m)

    for m in parts:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    handles = [m.register_forward_pre_hook(record) for m in parts if isinstance(m, nn.Linear)]

    def zero_output(x, *args, **kwargs):
        seen["input"] = x
        return x.new_zeros(*x.shape[:-1], module.out_features)

    try:
        full = _layer_output(layer(hidden, **kwargs))
        last_called = calls[-1] if calls else None
        module.forward = zero_output
        try:
            without = _layer_output(layer(hidden, **kwargs))
        finally:
            del module.forward
        if last_called is not module or "input" not in seen:
            return False
        return torch.equal(full, without + module.forward(seen["input"]))
    finally:
        for handle in handles:
            handle.remove()
        for m, (pre, post) in zip(parts, saved):
            m._forward_pre_hooks, m._forward_hooks = pre, post


class _Cancelled(BaseException):
    """Unwinds a paused batch forward whose layer pass failed elsewhere."""


class BatchCoroutine:
    """`fn()` on a thread of its own that runs only between `resume()` and its next `suspend()`:
    exactly one of the caller and the coroutine runs at a time, so a set of them executes in an
    order as deterministic as a plain loop's. Thread-local torch state (grad mode, CUDA device)
    is set up by `fn` itself."""

    _current = threading.local()

    def __init__(self, fn: Callable[[], object], name: str = "fabricq-batch"):
        self._fn = fn
        self._wake = threading.Semaphore(0)
        self._yielded = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._body, name=name, daemon=True)
        self._cancel = False
        self.started = self.done = False
        self.result = None
        self.error: BaseException | None = None
        self.position = None  # what the coroutine passed to its last `suspend`

    @classmethod
    def current(cls) -> "BatchCoroutine | None":
        return getattr(cls._current, "coroutine", None)

    def _body(self) -> None:
        BatchCoroutine._current.coroutine = self
        self._wake.acquire()
        try:
            if self._cancel:
                raise _Cancelled
            self.result = self._fn()
        except BaseException as err:  # handed to the caller of resume()
            self.error = err
        self.done = True
        self.position = None
        self._yielded.release()

    def resume(self):
        """Run the coroutine until it suspends (returns its position) or ends (returns None)."""
        if not self.started:
            self.started = True
            self._thread.start()
        self._wake.release()
        self._yielded.acquire()
        if self.error is not None and not isinstance(self.error, _Cancelled):
            error, self.error = self.error, None
            raise error
        return self.position

    def suspend(self, position) -> None:
        """Called on the coroutine's own thread: hand control back to `resume`'s caller."""
        self.position = position
        self._yielded.release()
        self._wake.acquire()
        if self._cancel:
            raise _Cancelled

    def cancel(self) -> None:
        """Unwind a started, unfinished coroutine (its pending suspend raises) and wait for it."""
        if self.started and not self.done:
            self._cancel = True
            self._wake.release()
            self._yielded.acquire()
        if self.started:
            self._thread.join()


class CalibrationLoop:
    """Drives layer-by-layer calibration of `model` on `samples` (num_samples, seq_len).

    `cache`: where hidden states live between layers (default: unlimited memory). `prefetch`:
    copy the next layer's weights to the compute device while the current one runs. `lag`: 0, or
    1 to end each layer (solve it) on a worker thread while the next one is calibrated."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, *, device, batch_size: int, callbacks,
                 cache: ActivationCache | None = None, prefetch: bool = True, lag: int = 0):
        if lag not in (0, 1):
            raise ValueError(f"lag must be 0 or 1, got {lag!r}")
        self.model = model
        self.samples = samples
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.callbacks = list(callbacks)
        self.layers = decoder_layers(model)
        self.prefix = layer_prefix(model, self.layers)
        self.num_layers = len(self.layers)
        self.cache = cache if cache is not None else ActivationCache(self.device, prefetch=prefetch)
        self.transfer = TransferStream(self.device)
        self.prefetch = prefetch
        self.lag = lag
        self.kwargs: list[dict] = []
        self._additive_last_gate: dict[tuple, bool] = {}

    def layer_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def _fire(self, hook: str, *args):
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks]

    @torch.no_grad()
    def _forward(self, layer: nn.Module, inputs: Stage, index: int, observe: bool, outputs: Stage | None) -> None:
        for b, (hidden, kwargs) in enumerate(zip(inputs, self.kwargs)):
            try:
                out = _layer_output(layer(hidden, **kwargs))
            except StopLayerForward:  # a callback saw all it needed; this output is not used
                out = None
            if outputs is not None:
                outputs.append(out)
            if observe:
                self._fire("on_batch_end", index, b)

    def _run_batch(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict):
        """One batch through `layer` on a coroutine's thread (grad mode and device are per thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.no_grad():
            return _layer_output(layer(hidden, **kwargs))

    def _forward_gated(self, layer: nn.Module, inputs: Stage, index: int, gates: list[str],
                       outputs: Stage | None, release_inputs: bool = False) -> None:
        """Every batch through `layer` at once, pausing all of them before each gate module (see
        the module docstring); `outputs` receives the layer's outputs after the last gate.
        `release_inputs`: free `inputs` once every batch has finished the layer."""
        modules = dict(layer.named_modules(prefix=self.layer_name(index)))
        unknown = [g for g in gates if g not in modules]
        if unknown:
            raise ValueError(f"gates {unknown} are not modules of {self.layer_name(index)}")
        opened: set[str] = set()
        share_one_malloc_arena()
        gates = list(dict.fromkeys(gates))
        # The last gate, if the layer's output is just added to its module's (see
        # `output_adds_module_output`): batches do not pause there but finish the layer with that
        # module returning zeros, keeping only its input; once the module is quantized, its output
        # is added. What a paused batch would hold besides that input (its frames: the normed
        # activations, the residual that becomes the output, the call's arguments) is not held.
        last, last_inputs = None, {}
        handles = []

        def gate(name):
            def pause(module, args):
                coroutine = BatchCoroutine.current()
                if coroutine is not None and name not in opened:
                    coroutine.suspend(name)
            return pause

        def keep_input(x, *args, **kwargs):
            last_inputs[BatchCoroutine.current()] = x
            return x.new_zeros(*x.shape[:-1], modules[last].out_features)

        batches: list[BatchCoroutine] = []
        try:
            for b, (hidden, kwargs) in enumerate(zip(inputs, self.kwargs)):
                if b == 0:
                    last = gates[-1] if self._finishes_before(layer, index, modules[gates[-1]], hidden, kwargs) else None
                    # Registered after the callbacks' own pre-hooks (added at on_layer_start):
                    # they observe a batch's input before it pauses.
                    handles = [modules[g].register_forward_pre_hook(gate(g)) for g in gates if g != last]
                    if last is not None:
                        modules[last].forward = keep_input
                batch = BatchCoroutine(lambda h=hidden, k=kwargs: self._run_batch(layer, h, k),
                                       name=f"fabricq-batch{b}")
                batches.append(batch)
                batch.resume()
                del hidden
            while not all(b.done for b in batches):
                positions = {b.position for b in batches}
                if len(positions) != 1:
                    where = ", ".join(f"batch {i}: {b.position or 'finished'}" for i, b in enumerate(batches))
                    raise RuntimeError(
                        f"batches took different paths through {self.layer_name(index)} ({where}); "
                        "a gated (true-sequential) forward needs every batch to call the same modules"
                    )
                name = positions.pop()
                self._fire("on_gate", index, layer, name)
                opened.add(name)
                for batch in batches:
                    batch.resume()
            if release_inputs:
                inputs.release()
            if last is not None:
                del modules[last].forward
                self._fire("on_gate", index, layer, last)
                opened.add(last)
            for b, batch in enumerate(batches):
                if outputs is not None:
                    result = batch.result
                    if last is not None:  # the forward its pre-hooks already saw, without them
                        result = result + modules[last].forward(last_inputs.pop(batch))
                    outputs.append(result)
                    del result
                last_inputs.pop(batch, None)
                batch.result = None
                self._fire("on_batch_end", index, b)
        finally:
            if last is not None:
                modules[last].__dict__.pop("forward", None)
            for batch in batches:
                batch.cancel()
            for handle in handles:
                handle.remove()

    def _finishes_before(self, layer: nn.Module, index: int, module: nn.Module, hidden, kwargs) -> bool:
        """Whether batches can finish `layer` before its last gate `module` is quantized: checked
        once per kind of layer (class and module path), on the first batch that reaches it."""
        key = (type(layer), self._relative_name(module, layer))
        if key not in self._additive_last_gate:
            self._additive_last_gate[key] = output_adds_module_output(layer, module, hidden, kwargs)
        return self._additive_last_gate[key]

    @staticmethod
    def _relative_name(module: nn.Module, layer: nn.Module) -> str:
        return next(name for name, m in layer.named_modules() if m is module)

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
                sink=stage.append if stage is not None else None,
            )
        finally:
            self._move_outside_layers(home)
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
        if self.lag and observe:
            self._run_lagged(start_layer, inputs)
        else:
            self._run_in_step(start_layer, inputs, observe)
        self._fire("on_run_end")

    def _run_in_step(self, start_layer: int, inputs: Stage | None, observe: bool) -> None:
        home = next(self.layers.parameters()).device
        layer_loader = Prefetcher(self.prefetch, "fabricq-layer")
        last = self.num_layers - 1
        pending = layer_loader.submit(lambda: self.transfer.module_to_device(self.layers[start_layer])) \
            if start_layer <= last else None
        try:
            for index in range(start_layer, self.num_layers):
                layer = self.layers[index]
                self.transfer.wait_all(pending.result())
                if index < last:  # the next layer's weights travel while this one computes
                    pending = layer_loader.submit(lambda i=index + 1: self.transfer.module_to_device(self.layers[i]))
                self._fire("on_layer_start", index, layer)
                outputs = None
                gates = [g for gates in self._fire("gates", index, layer) for g in gates] if observe else []
                release = bool(gates) and not any(cb.changes_layer_after_gates for cb in self.callbacks)
                if gates:  # one forward: it observes and already yields the quantized layer's outputs
                    outputs = self.cache.new_stage() if index < last else None
                    self._forward_gated(layer, inputs, index, gates, outputs, release_inputs=release)
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
                if inputs is not None:
                    inputs.release()
                inputs = outputs
                layer.to(home)
                self._fire("on_layer_complete", index, inputs)
        finally:
            layer_loader.close()
            if inputs is not None:
                inputs.release()

    def _end_layer_on_worker(self, index: int, layer: nn.Module) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.no_grad():  # grad mode is per thread
            self._fire("on_layer_end", index, layer)

    def _run_lagged(self, start_layer: int, inputs: Stage) -> None:
        """`lag=1` (see the module docstring): per layer, one calibration forward that also keeps
        the outputs, then `on_layer_end` on a worker. Layer i is complete (`on_layer_complete`
        with the next layer's inputs, i.e. its unquantized outputs) once its worker has finished,
        which the loop waits for after layer i+1's forward; only then does layer i+2's prefetch
        start, so at most two layers are on the compute device."""
        if start_layer >= self.num_layers:  # a resumed run whose every layer is finished
            return
        home = next(self.layers.parameters()).device
        layer_loader = Prefetcher(self.prefetch, "fabricq-layer")
        solver = ThreadPoolExecutor(1, thread_name_prefix="fabricq-lag")
        last = self.num_layers - 1
        pending = layer_loader.submit(lambda: self.transfer.module_to_device(self.layers[start_layer]))
        ending: tuple[int, Future] | None = None  # the layer being solved on the worker

        def complete_previous(next_inputs: Stage | None) -> None:
            nonlocal ending
            if ending is None:
                return
            previous, future = ending
            ending = None
            future.result()  # the worker's error, if any, surfaces here
            self.layers[previous].to(home)
            self._fire("on_layer_complete", previous, next_inputs)

        try:
            for index in range(start_layer, self.num_layers):
                layer = self.layers[index]
                self.transfer.wait_all(pending.result())
                self._fire("on_layer_start", index, layer)
                if [g for gates in self._fire("gates", index, layer) for g in gates]:
                    raise ValueError("a lagged pipeline (lag=1) cannot run gated (true-sequential) forwards")
                outputs = self.cache.new_stage() if index < last else None
                self._forward(layer, inputs, index, observe=True, outputs=outputs)
                complete_previous(inputs)  # this layer's inputs are the previous one's outputs
                if index < last:  # the next layer's weights travel while this one is solved
                    pending = layer_loader.submit(lambda i=index + 1: self.transfer.module_to_device(self.layers[i]))
                inputs.release()
                inputs = outputs
                ending = (index, solver.submit(self._end_layer_on_worker, index, layer))
            complete_previous(None)
        finally:
            solver.shutdown(wait=True)  # never leave a worker writing weights behind an error
            layer_loader.close()
            if inputs is not None:
                inputs.release()

    def _move_outside_layers(self, device) -> None:
        inside = {id(m) for m in self.layers.modules()}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(device)
