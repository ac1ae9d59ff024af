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

from fabricq.callbacks.base import Callback
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.calibration.loop import CalibrationLoop
from fabricq.errors import FabricqError
from fabricq.sysmem import release_freed_memory
from fabricq.models import linear_modules
from fabricq.quant.gptq import PackedQuantizedWeight, PreparedHessian, QuantizedWeight, gptq_solve, layer_objectives, prepare_hessian, rtn_quantize
from fabricq.quant.grid import QuantScheme, effective_group_size

log = logging.getLogger("fabricq")




# A stacked solve holds a few (rows, columns) float32 buffers of the whole stack at once (the
# weights, per-column scales and zeros, codes): groups whose weights exceed this many elements
# (256 MiB in float32; e.g. gate/up of an 8B model) are solved in consecutive batches of modules —
# at such row counts the per-column loop that stacking saves is small next to the rows' work.
STACKED_SOLVE_ELEMENTS = 1 << 26


@dataclass
class GPTQSettings:
    method: str = "gptq"  # "gptq" or "rtn"
    scheme: QuantScheme = QuantScheme()
    damp: float = 0.01
    block_size: int = 128
    hessian_dtype: torch.dtype = torch.float32
    ignore: tuple[str, ...] = ()  # regexes of module names left unquantized
    solve_threads: int = 1  # shared-input groups of a layer solved concurrently (results do not depend on it)
    # Quantize each shared-input group of a layer (q/k/v, o, gate/up, down) before the next one
    # is calibrated, in one gated forward per layer (see fabricq.calibration); False: calibrate
    # every module of a layer on the unquantized layer, then forward it again.
    true_sequential: bool = False


@dataclass
class LayerState:
    """What GPTQCallback knows about one decoder layer between its start and its end. Per layer,
    not per callback: with `pipeline.lag=1` a layer is solved (on a worker thread) while the next
    one is calibrated."""

    index: int
    targets: dict[str, nn.Linear]  # full module name → module
    hessians: SharedInputHessians | None = None  # None for round-to-nearest
    solved: set[str] = field(default_factory=set)


@dataclass
class _SharedPreparation:
    """A shared-input group's mean Hessian and its GPTQ preparation, until every member has it."""

    waiting: set[str]  # members that have not fetched it yet
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: tuple[torch.Tensor, PreparedHessian] | None = None


class GPTQCallback(Callback):
    """Quantizes every Linear of each decoder layer: at the end of its calibration pass, or, with
    `true_sequential`, group by group at gates of a single forward — each group of modules
    sharing an input once every batch has reached it, so later groups are calibrated on the
    outputs of the quantized earlier ones. The groups are learnt on the first layer (gating
    every module there) and reused for layers with the same module names.

    Results: `quantized` (module name → QuantizedWeight, or PackedQuantizedWeight below 8 bits) and `stats` (per-module objective of
    GPTQ and of round-to-nearest on the same Hessian, seconds, damping, effective group size).
    """

    changes_layer_after_gates = False  # with gates, every group is solved at its gate

    def __init__(self, settings: GPTQSettings):
        self.settings = settings
        self.needs_activations = settings.method == "gptq"
        self.quantized: dict[str, QuantizedWeight] = {}
        self.stats: dict[str, dict] = {}
        self._layers: dict[int, LayerState] = {}  # layers started and not yet ended
        self._groupings: dict[tuple[str, ...], list[list[str]]] = {}  # layer shape → groups (relative names)
        # Prepared Hessians of the layer being solved (see `_prepared_hessian`).
        self._prepared: dict[str, _SharedPreparation] = {}
        self._prepared_for: weakref.ref | None = None
        self._prepared_lock = threading.Lock()
        # Wall seconds of the solve steps (everything between a gate or a layer's end and the
        # batches going on: solves, installs, and on several ranks the collectives).
        self.solve_steps_s = 0.0

    def targets(self, loop: CalibrationLoop, index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        ignore = [re.compile(p) for p in self.settings.ignore]
        modules = linear_modules(layer, loop.layer_name(index))
        return {n: m for n, m in modules.items() if not any(p.search(n) for p in ignore)}

    def scheme_for(self, module: nn.Linear) -> QuantScheme:
        return self.scheme_for_width(module.in_features)

    def scheme_for_width(self, in_features: int) -> QuantScheme:
        base = self.settings.scheme
        return replace(base, group_size=effective_group_size(base.group_size, in_features))

    @property
    def _gated(self) -> bool:
        return self.settings.true_sequential and self.settings.method == "gptq"

    @staticmethod
    def _shape_key(loop, state: LayerState) -> tuple[str, ...]:
        cut = len(loop.layer_name(state.index)) + 1
        return tuple(name[cut:] for name in state.targets)

    def new_layer_state(self, index: int, targets: dict[str, nn.Linear]) -> LayerState:
        return LayerState(index, targets)

    def on_layer_start(self, loop, index, layer):
        state = self._layers[index] = self.new_layer_state(index, self.targets(loop, index, layer))
        if self.settings.method == "gptq":
            groups = None
            known = self._groupings.get(self._shape_key(loop, state)) if self._gated else None
            if known is not None:
                prefix = loop.layer_name(index) + "."
                groups = [[prefix + n for n in group] for group in known]
            # The calibration forward may stop after the last module's input unless its outputs
            # are used: gated, or with a lag, where the next layer is fed the unquantized outputs.
            stop_early = not self._gated and not getattr(loop, "lag", 0)
            state.hessians = SharedInputHessians(
                state.targets, self.settings.hessian_dtype, stop_early=stop_early, groups=groups)

    def gates(self, loop, index, layer) -> list[str]:
        state = self._layers[index]
        if not self._gated or not state.targets:
            return []
        if state.hessians.preset:  # one gate per group, at the member called first
            return [group[0] for group in state.hessians.groups()]
        return list(state.targets)  # grouping unknown yet: every module waits for all batches

    def on_gate(self, loop, index, layer, name):
        state = self._layers[index]
        if name not in state.targets:
            return
        group = state.hessians.group_of(name) if state.hessians.preset else [name]
        pending = [n for n in group if n not in state.solved]
        if pending:
            self._solve_step(state, [pending])

    def _solve_step(self, state: LayerState, groups: list[list[str]]) -> None:
        start = time.perf_counter()
        self.solve_groups(state, groups)
        self.solve_steps_s += time.perf_counter() - start

    def on_batch_end(self, loop, index, batch):
        hessians = self._layers[index].hessians
        if hessians is not None:
            hessians.end_batch()

    def on_layer_end(self, loop, index, layer) -> bool:
        state = self._layers[index]
        hessians = state.hessians
        if hessians is not None:
            hessians.remove()
            silent = [n for n in state.targets if n not in hessians.leader]
            if silent:
                raise FabricqError(f"{', '.join(silent)} received no calibration input in the forward pass")
            groups = hessians.groups()
            if self._gated and not hessians.preset:
                cut = len(loop.layer_name(index)) + 1
                self._groupings[self._shape_key(loop, state)] = [[n[cut:] for n in g] for g in groups]
        else:
            groups = [[name] for name in state.targets]
        pending = [[n for n in g if n not in state.solved] for g in groups]
        pending = [g for g in pending if g]
        if pending:
            self._solve_step(state, pending)
        del self._layers[index]
        release_freed_memory()  # the layer's activations and Hessians, so they do not pile up in the heap
        return bool(pending)

    def final_through(self, index: int) -> int:
        """The last layer whose quantized weights are final once layer `index` is complete: the
        layer itself here; earlier with a solve window (see DistributedGPTQCallback)."""
        return index

    def close(self) -> None:
        """Release workers (a run that failed midway included)."""

    def solve_groups(self, state: LayerState, groups: list[list[str]]) -> None:
        """Quantize the modules of `groups` (lists of modules sharing a Hessian) of layer `state`."""
        hessians, targets = state.hessians, state.targets
        names = [n for group in groups for n in group]
        if self.settings.solve_threads > 1 and len(groups) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # Groups of one layer are independent; torch releases the GIL inside their solves.
            with ThreadPoolExecutor(self.settings.solve_threads, thread_name_prefix="fabricq-solve") as pool:
                list(pool.map(lambda g: self.quantize_group(g, [targets[n] for n in g], hessians), groups))
            for table in (self.quantized, self.stats):  # the order of a sequential run
                for name in names:
                    table[name] = table.pop(name)
        else:
            for group in groups:
                self.quantize_group(group, [targets[n] for n in group], hessians)
        state.solved.update(names)

    def quantize_group(self, names: list[str], modules: list[nn.Linear], hessians: SharedInputHessians | None) -> None:
        """Quantize and install modules that share one input (or a single module)."""
        solved = self.solve_modules(names, [m.weight.data for m in modules], hessians)
        for name, module, (result, stats, dequantized) in zip(names, modules, solved):
            self.install(name, module, result, stats, dequantized)

    def solve_modules(self, names: list[str], weights: list[torch.Tensor], hessians: SharedInputHessians | None
                      ) -> list[tuple[QuantizedWeight, dict, torch.Tensor | None]]:
        """Quantize the `weights` of modules `names` that share one input (q/k/v, gate/up, or a
        single module; GPTQ on their shared Hessian, or round-to-nearest): per module, its result,
        stats, and the dequantized weight (GPTQ only; None for round-to-nearest).

        GPTQ solves the modules as one matrix, their rows stacked: rows are independent given the
        Hessian, so each module gets its own solve's result (bit for bit on the CPUs tested), but
        the column-by-column loop, whose cost hardly depends on the rows, runs once per group
        instead of once per module. Each module's `seconds` is its share (by rows) of the joint
        solve plus its own report objectives."""
        start = time.perf_counter()
        scheme = self.scheme_for_width(weights[0].shape[1])
        if hessians is None:
            solved = []
            for weight in weights:
                began = time.perf_counter()
                result = rtn_quantize(weight, scheme, weight.dtype)
                solved.append((result, self._module_stats(result, scheme, {}, time.perf_counter() - began), None))
            return solved
        # Consecutive modules are stacked while they share a dtype (scales are rounded to it) and
        # stay under STACKED_SOLVE_ELEMENTS together (a larger module goes alone).
        batches, size = [[]], 0
        for i, w in enumerate(weights):
            if batches[-1] and (w.dtype != weights[i - 1].dtype or size + w.numel() > STACKED_SOLVE_ELEMENTS):
                batches.append([])
                size = 0
            batches[-1].append(i)
            size += w.numel()
        if len(batches) > 1:
            return [s for batch in batches
                    for s in self.solve_modules([names[i] for i in batch], [weights[i] for i in batch], hessians)]
        h, prepared = self._prepared_hessian(names, hessians, scheme)
        rows = [w.shape[0] for w in weights]
        joint = gptq_solve(
            weights[0] if len(weights) == 1 else torch.cat(weights), prepared, scheme,
            block_size=self.settings.block_size, scale_dtype=weights[0].dtype, name=", ".join(names),
        )
        results = joint.split_rows(rows) if len(weights) > 1 else [joint]
        shared_s = time.perf_counter() - start
        tokens = hessians.accumulators[hessians.leader[names[0]]].tokens
        solved = []
        for weight, result, n_rows in zip(weights, results, rows):
            began = time.perf_counter()
            dequantized = result.dequantize().to(weight.device)  # reused for the new weight
            rtn = rtn_quantize(weight, scheme, weight.dtype).dequantize().to(weight.device)
            loss, rtn_loss = layer_objectives(weight, [dequantized, rtn], h)
            seconds = time.perf_counter() - began + shared_s * n_rows / sum(rows)
            stats = {"loss": loss, "rtn_loss": rtn_loss, "tokens": tokens}
            solved.append((result, self._module_stats(result, scheme, stats, seconds), dequantized))
        return solved

    @staticmethod
    def _module_stats(result: QuantizedWeight, scheme: QuantScheme, stats: dict, seconds: float) -> dict:
        return {
            **stats,
            "method": result.info.get("method"),
            "damp": result.info.get("damp"),
            "group_size": scheme.group_size,
            "seconds": round(seconds, 4),
        }

    def _prepared_hessian(self, names: list[str], hessians: SharedInputHessians,
                          scheme: QuantScheme) -> tuple[torch.Tensor, PreparedHessian]:
        """The mean Hessian of modules `names` (members of one shared-input group) and its
        `prepare_hessian`, computed once per group (q/k/v, gate/up: the factorization is most of
        a small module's solve) by whichever caller asks first — a group may be solved in parts
        (a gated first layer solves q, then k; row slices) — and dropped once every member of the
        group has fetched it. Members share their input width, hence their scheme."""
        leader = hessians.leader[names[0]]
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
                h = hessians.hessian(names[0])
                entry.value = (h, prepare_hessian(h, scheme.actorder, damp=self.settings.damp))
            value = entry.value
        with self._prepared_lock:
            entry.waiting.difference_update(names)
            if not entry.waiting and self._prepared.get(leader) is entry:
                del self._prepared[leader]
        return value

    def install(self, name: str, module: nn.Linear, result: "QuantizedWeight | PackedQuantizedWeight", stats: dict,
                dequantized: torch.Tensor | None = None) -> None:
        """Put a module's quantized weight in place (also how a resumed run restores finished layers)."""
        if dequantized is None:
            dequantized = result.dequantize()
        weight = module.weight.data
        # In place: loaded weights are often a private memory map of the checkpoint file; writing
        # into them replaces those pages, where a new tensor would keep both resident.
        weight.copy_(dequantized.to(device=weight.device, dtype=weight.dtype))
        # Kept until export: packed below 8 bits (4-bit codes in half the bytes of int8).
        if isinstance(result, QuantizedWeight) and result.scheme.bits < 8:
            result = result.packed()
        self.quantized[name] = result
        self.stats[name] = stats




