"""The gated forward: one forward per layer for true-sequential calibration.

A callback may name modules of a layer as *gates* (`Callback.gates`). Each batch's forward then
runs as a `BatchCoroutine` that pauses just before a gate until every batch has reached it;
`on_gate` fires in between (GPTQ quantizes the modules reading that input), and the batches
continue through the changed module. The forward that observed the inputs thus already produces
the quantized layer's outputs, and no second pass is needed. Coroutines take turns (one runs at
a time, batches in order), so every sum is added in the same order as in a plain loop.

The last gate is special when the layer's output is just added to its module's
(`output_adds_module_output`, true of pre-norm decoder layers and their down_proj): batches do
not pause there but finish the layer with that module returning zeros, keeping only its input;
once the module is quantized, its output is added. What a paused batch would hold besides that
input (its frames: the normed activations, the residual that becomes the output, the call's
arguments) is not held.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from fabricq.sysmem import share_one_malloc_arena


def layer_output(out):
    """The hidden states a decoder layer returns (alone, or first of a tuple)."""
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
        full = layer_output(layer(hidden, **kwargs))
        last_called = calls[-1] if calls else None
        module.forward = zero_output
        try:
            without = layer_output(layer(hidden, **kwargs))
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


class GatedForward:
    """Runs gated forwards of layers on `device` (see the module docstring), remembering per kind
    of layer whether its batches may finish before the last gate."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._additive_last_gate: dict[tuple, bool] = {}

    def _run_batch(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict):
        """One batch through `layer` on a coroutine's thread (grad mode and device are per thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.no_grad():
            return layer_output(layer(hidden, **kwargs))

    @torch.no_grad()
    def run(self, layer: nn.Module, name: str, inputs, kwargs: list[dict], gates: list[str], *,
            on_gate: Callable[[str], None], on_batch_end: Callable[[int], None], outputs=None,
            release_inputs: bool = False) -> None:
        """Every batch of `inputs` (with its `kwargs`) through `layer` (named `name`) at once,
        pausing all of them before each of the `gates` (full module names) and calling
        `on_gate(gate)` there; `on_batch_end(b)` once all are through. `outputs` (a cache
        stage, or None) receives the layer's outputs after the last gate. `release_inputs`:
        free `inputs` once every batch has finished the layer."""
        modules = dict(layer.named_modules(prefix=name))
        unknown = [g for g in gates if g not in modules]
        if unknown:
            raise ValueError(f"gates {unknown} are not modules of {name}")
        opened: set[str] = set()
        share_one_malloc_arena()
        gates = list(dict.fromkeys(gates))
        last, last_inputs = None, {}  # the last gate, if batches finish before it (module docstring)
        handles = []

        def gate(gate_name):
            def pause(module, args):
                coroutine = BatchCoroutine.current()
                if coroutine is not None and gate_name not in opened:
                    coroutine.suspend(gate_name)
            return pause

        def keep_input(x, *args, **kw):
            last_inputs[BatchCoroutine.current()] = x
            return x.new_zeros(*x.shape[:-1], modules[last].out_features)

        batches: list[BatchCoroutine] = []
        try:
            for b, (hidden, batch_kwargs) in enumerate(zip(inputs, kwargs)):
                if b == 0:
                    if self._finishes_before(layer, modules[gates[-1]], hidden, batch_kwargs):
                        last = gates[-1]
                    # Registered after the callbacks' own pre-hooks (added at on_layer_start):
                    # they observe a batch's input before it pauses.
                    handles = [modules[g].register_forward_pre_hook(gate(g)) for g in gates if g != last]
                    if last is not None:
                        modules[last].forward = keep_input
                batch = BatchCoroutine(lambda h=hidden, k=batch_kwargs: self._run_batch(layer, h, k),
                                       name=f"fabricq-batch{b}")
                batches.append(batch)
                batch.resume()
                del hidden
            while not all(b.done for b in batches):
                positions = {b.position for b in batches}
                if len(positions) != 1:
                    where = ", ".join(f"batch {i}: {b.position or 'finished'}" for i, b in enumerate(batches))
                    raise RuntimeError(
                        f"batches took different paths through {name} ({where}); "
                        "a gated (true-sequential) forward needs every batch to call the same modules"
                    )
                reached = positions.pop()
                on_gate(reached)
                opened.add(reached)
                for batch in batches:
                    batch.resume()
            if release_inputs:
                inputs.release()
            if last is not None:
                del modules[last].forward
                on_gate(last)
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
                on_batch_end(b)
        finally:
            if last is not None:
                modules[last].__dict__.pop("forward", None)
            for batch in batches:
                batch.cancel()
            for handle in handles:
                handle.remove()

    def _finishes_before(self, layer: nn.Module, module: nn.Module, hidden, kwargs) -> bool:
        """Whether batches can finish `layer` before its last gate `module` is quantized: checked
        once per kind of layer (class and module path), on the first batch that reaches it."""
        key = (type(layer), next(name for name, m in layer.named_modules() if m is module))
        if key not in self._additive_last_gate:
            self._additive_last_gate[key] = output_adds_module_output(layer, module, hidden, kwargs)
        return self._additive_last_gate[key]
