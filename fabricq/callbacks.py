"""Callbacks on the calibration loop: GPTQ (or round-to-nearest) quantization and progress."""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fabricq.calibration import Callback, CalibrationLoop, StopLayerForward
from fabricq.memory import release_freed_memory
from fabricq.models import linear_modules
from fabricq.quant.gptq import PreparedHessian, QuantizedWeight, gptq_solve, layer_objectives, prepare_hessian, rtn_quantize
from fabricq.quant.grid import QuantScheme, effective_group_size
from fabricq.quant.hessian import HessianAccumulator

log = logging.getLogger("fabricq")


class SharedInputHessians:
    """One Hessian per distinct input of a layer's Linear modules.

    q/k/v (and gate/up) read the very same tensor, so they share one accumulator: which modules
    share is learnt from the first batch (same tensor object → same group), for any architecture.
    References to the batch's inputs are held until `end_batch` so a freed tensor's id cannot be
    reused by a different input within the batch.

    From the second batch on, once the last module (in call order) has given its input, the rest
    of the layer's calibration forward is skipped (`StopLayerForward`): its output would be
    discarded anyway, as the quantized layer is forwarded again for the next layer.
    """

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype, stop_early: bool = True):
        self.modules = modules
        self.stop_early = stop_early
        self.dtype = dtype
        self.leader: dict[str, str] = {}  # module → module whose accumulator it uses
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._grouped = False
        self._order: list[str] = []  # call order in the first batch
        self._stop_after: str | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def observe(module, args):
            x = args[0]
            if not self._grouped:
                self._order.append(name)
                seen = self._seen.get(id(x))
                if seen is not None and seen[1] is x:
                    self.leader[name] = seen[0]
                    return
                self._seen[id(x)] = (name, x)
                self.leader[name] = name
                self.accumulators[name] = HessianAccumulator(x.shape[-1], self.dtype, x.device)
                self.accumulators[name].add(x)
                return
            if self.leader[name] == name:
                self.accumulators[name].add(x)
            if name == self._stop_after:
                raise StopLayerForward

        return observe

    def end_batch(self) -> None:
        self._seen.clear()
        once = len(set(self._order)) == len(self._order) == len(self.modules)
        if self.stop_early and not self._grouped and once:
            self._stop_after = self._order[-1]  # every module runs once per forward
        self._grouped = True

    def hessian(self, name: str) -> torch.Tensor:
        return self.accumulators[self.leader[name]].mean()

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.modules:
            out.setdefault(self.leader[name], []).append(name)
        return list(out.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class GPTQSettings:
    method: str = "gptq"  # "gptq" or "rtn"
    scheme: QuantScheme = QuantScheme()
    damp: float = 0.01
    block_size: int = 128
    hessian_dtype: torch.dtype = torch.float32
    ignore: tuple[str, ...] = ()  # regexes of module names left unquantized
    solve_threads: int = 1  # modules of a layer solved concurrently (results do not depend on it)


@dataclass
class _SharedPreparation:
    """A shared-input group's mean Hessian and its GPTQ preparation, until every member has it."""

    waiting: set[str]  # members that have not fetched it yet
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: tuple[torch.Tensor, PreparedHessian] | None = None


class GPTQCallback(Callback):
    """Quantizes every Linear of each decoder layer at the end of its calibration pass.

    Results: `quantized` (module name → QuantizedWeight) and `stats` (per-module objective of
    GPTQ and of round-to-nearest on the same Hessian, seconds, damping, effective group size).
    """

    def __init__(self, settings: GPTQSettings):
        self.settings = settings
        self.needs_activations = settings.method == "gptq"
        self.quantized: dict[str, QuantizedWeight] = {}
        self.stats: dict[str, dict] = {}
        self._targets: dict[str, nn.Linear] = {}
        self._hessians: SharedInputHessians | None = None
        # Prepared Hessians of the layer being solved (see `_prepared_hessian`).
        self._prepared: dict[str, _SharedPreparation] = {}
        self._prepared_for: weakref.ref | None = None
        self._prepared_lock = threading.Lock()

    def targets(self, loop: CalibrationLoop, index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        ignore = [re.compile(p) for p in self.settings.ignore]
        modules = linear_modules(layer, loop.layer_name(index))
        return {n: m for n, m in modules.items() if not any(p.search(n) for p in ignore)}

    def scheme_for(self, module: nn.Linear) -> QuantScheme:
        base = self.settings.scheme
        return replace(base, group_size=effective_group_size(base.group_size, module.in_features))

    def on_layer_start(self, loop, index, layer):
        self._targets = self.targets(loop, index, layer)
        if self.settings.method == "gptq":
            self._hessians = SharedInputHessians(self._targets, self.settings.hessian_dtype)

    def on_batch_end(self, loop, index, batch):
        if self._hessians is not None:
            self._hessians.end_batch()

    def on_layer_end(self, loop, index, layer) -> bool:
        hessians = self._hessians
        if hessians is not None:
            hessians.remove()
        if self.settings.solve_threads > 1 and len(self._targets) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # Solves of one layer are independent; torch releases the GIL inside them.
            with ThreadPoolExecutor(self.settings.solve_threads, thread_name_prefix="fabricq-solve") as pool:
                list(pool.map(lambda item: self.quantize_module(*item, hessians), self._targets.items()))
            for table in (self.quantized, self.stats):  # the order of a sequential run
                for name in self._targets:
                    table[name] = table.pop(name)
        else:
            for name, module in self._targets.items():
                self.quantize_module(name, module, hessians)
        self._hessians = None
        release_freed_memory()  # the layer's activations and Hessians, so they do not pile up in the heap
        return bool(self._targets)

    def quantize_module(self, name: str, module: nn.Linear, hessians: SharedInputHessians | None) -> None:
        start = time.perf_counter()
        weight = module.weight.data
        scheme = self.scheme_for(module)
        scale_dtype = weight.dtype
        if hessians is None:
            result = rtn_quantize(weight, scheme, scale_dtype)
            stats = {}
        else:
            h, prepared = self._prepared_hessian(name, hessians, scheme)
            result = gptq_solve(
                weight, prepared, scheme, block_size=self.settings.block_size, scale_dtype=scale_dtype, name=name,
            )
            dequantized = result.dequantize().to(weight.device)  # reused for the new weight below
            rtn = rtn_quantize(weight, scheme, scale_dtype).dequantize().to(weight.device)
            loss, rtn_loss = layer_objectives(weight, [dequantized, rtn], h)
            stats = {
                "loss": loss,
                "rtn_loss": rtn_loss,
                "tokens": hessians.accumulators[hessians.leader[name]].tokens,
            }
        self.install(name, module, result, {
            **stats,
            "method": result.info.get("method"),
            "damp": result.info.get("damp"),
            "group_size": scheme.group_size,
            "seconds": round(time.perf_counter() - start, 4),
        }, dequantized if hessians is not None else None)

    def _prepared_hessian(self, name: str, hessians: SharedInputHessians,
                          scheme: QuantScheme) -> tuple[torch.Tensor, PreparedHessian]:
        """`name`'s mean Hessian and its `prepare_hessian`, computed once per shared-input group
        (q/k/v, gate/up: the factorization is most of a small module's solve) by whichever member
        asks first — solves of one layer may run in threads — and dropped once every member of the
        group has fetched it. Members share their input width, hence their scheme."""
        leader = hessians.leader[name]
        with self._prepared_lock:
            if self._prepared_for is None or self._prepared_for() is not hessians:
                # A new layer (or Hessians object): nothing prepared before can apply.
                self._prepared_for, self._prepared = weakref.ref(hessians), {}
            entry = self._prepared.get(leader)
            if entry is None:
                members = {n for n, lead in hessians.leader.items() if lead == leader}
                entry = self._prepared[leader] = _SharedPreparation(waiting=members)
        with entry.lock:
            if entry.value is None:
                h = hessians.hessian(name)
                entry.value = (h, prepare_hessian(h, scheme.actorder, damp=self.settings.damp))
            value = entry.value
        with self._prepared_lock:
            entry.waiting.discard(name)
            if not entry.waiting and self._prepared.get(leader) is entry:
                del self._prepared[leader]
        return value

    def install(self, name: str, module: nn.Linear, result: QuantizedWeight, stats: dict,
                dequantized: torch.Tensor | None = None) -> None:
        """Put a module's quantized weight in place (also how a resumed run restores finished layers)."""
        if dequantized is None:
            dequantized = result.dequantize()
        weight = module.weight.data
        # In place: loaded weights are often a private memory map of the checkpoint file; writing
        # into them replaces those pages, where a new tensor would keep both resident.
        weight.copy_(dequantized.to(device=weight.device, dtype=weight.dtype))
        self.quantized[name] = result
        self.stats[name] = stats


class ProgressCallback(Callback):
    """One log line per finished layer: `Layer 12/30 · 3.1 s · ETA 55 s`.

    A layer is finished once its outputs for the next layer exist, i.e. when the next layer
    starts (or the run ends), so the time includes the error-propagation pass."""

    def on_run_start(self, loop):
        self._run_start = self._layer_start = time.perf_counter()

    def _report(self, loop, done: int) -> None:
        now = time.perf_counter()
        eta = (now - self._run_start) / done * (loop.num_layers - done)
        log.info("Layer %d/%d · %.1f s · ETA %.0f s", done, loop.num_layers, now - self._layer_start, eta)
        self._layer_start = now

    def on_layer_start(self, loop, index, layer):
        if index > 0:
            self._report(loop, index)

    def on_run_end(self, loop):
        self._report(loop, loop.num_layers)
