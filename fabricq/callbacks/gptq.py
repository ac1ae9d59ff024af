"""The GPTQ (or round-to-nearest) callback of the calibration loop: per layer, Hessians of the
Linear inputs, solve steps handed to a `Solver`, and the quantized results."""

from __future__ import annotations

import math
import re
import time

import torch
from torch import nn

from fabricq.callbacks.base import Callback
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.callbacks.solver import GPTQSettings, LayerState, LocalSolver, Solver, held, quantize_and_install
from fabricq.calibration.loop import CalibrationLoop
from fabricq.errors import FabricqError
from fabricq.models import linear_modules
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.sysmem import release_freed_memory


class GPTQCallback(Callback):
    """Quantizes every Linear of each decoder layer: at the end of its calibration pass, or, with
    `true_sequential`, group by group at gates of a single forward — each group of modules
    sharing an input once every batch has reached it, so later groups are calibrated on the
    outputs of the quantized earlier ones. The groups are learnt on the first layer (gating
    every module there) and reused for layers with the same module names.

    Each solve step (the groups ready at a layer's end, or the group at a gate) goes to
    `solver`: `LocalSolver` by default (every group on this rank); see
    `fabricq.parallel.solvers.make_solver` for several ranks.

    Results: `quantized` (module name → QuantizedWeight, or PackedQuantizedWeight below 8 bits)
    and `stats` (per-module objective of GPTQ and of round-to-nearest on the same Hessian,
    seconds, damping, effective group size), both in module order.
    """

    changes_layer_after_gates = False  # with gates, every group is solved at its gate

    def __init__(self, settings: GPTQSettings, solver: Solver | None = None):
        self.settings = settings
        self.solver = solver if solver is not None else LocalSolver(settings)
        self.needs_activations = settings.method == "gptq"
        self.quantized: dict[str, QuantizedWeight | PackedQuantizedWeight] = {}
        self.stats: dict[str, dict] = {}
        self._layers: dict[int, LayerState] = {}  # layers started and not yet ended
        self._groupings: dict[tuple[str, ...], list[list[str]]] = {}  # layer shape → groups (relative names)
        # Wall seconds of the solve steps (everything between a gate or a layer's end and the
        # batches going on: solves, installs, and on several ranks the collectives).
        self.solve_steps_s = 0.0

    def targets(self, loop: CalibrationLoop, index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        ignore = [re.compile(p) for p in self.settings.ignore]
        modules = linear_modules(layer, loop.layer_name(index))
        return {n: m for n, m in modules.items() if not any(p.search(n) for p in ignore)}

    @property
    def _gated(self) -> bool:
        return self.settings.true_sequential and self.settings.method == "gptq"

    @staticmethod
    def _shape_key(loop, state: LayerState) -> tuple[str, ...]:
        cut = len(loop.layer_name(state.index)) + 1
        return tuple(name[cut:] for name in state.targets)

    def on_layer_start(self, loop, index, layer):
        state = self._layers[index] = LayerState(index, self.targets(loop, index, layer))
        if self.settings.method == "gptq":
            groups = None
            known = self._groupings.get(self._shape_key(loop, state)) if self._gated else None
            if known is not None:
                prefix = loop.layer_name(index) + "."
                groups = [[prefix + n for n in group] for group in known]
            # The calibration forward may stop after the last module's input unless its outputs
            # are used (gated: they are the next layer's inputs).
            state.hessians = SharedInputHessians(
                state.targets, self.settings.hessian_dtype, stop_early=not self._gated, groups=groups)

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
            self.solve_step(state, [pending])

    def solve_step(self, state: LayerState, groups: list[list[str]]) -> None:
        """Quantize `groups` (lists of modules sharing a Hessian) of layer `state` with the solver
        and keep their results, in module order."""
        start = time.perf_counter()
        self.solver.solve(state, groups, self.install)
        names = [n for group in groups for n in group]
        for table in (self.quantized, self.stats):  # in module order, however they were installed
            for name in names:
                table[name] = table.pop(name)
        state.solved.update(names)
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
            self.solve_step(state, pending)
        del self._layers[index]
        release_freed_memory()  # the layer's activations and Hessians, so they do not pile up in the heap
        return bool(pending)

    def close(self) -> None:
        """Release the solver's workers (a run that failed midway included)."""
        self.solver.close()

    def quantize_group(self, names: list[str], modules: list[nn.Linear], hessians: SharedInputHessians | None) -> None:
        """Quantize and install, on this rank, modules that share one input (or a single module)."""
        quantize_and_install(self.solver.quantizer, names, modules, hessians, self.install)

    def install(self, name: str, module: nn.Linear, result: "QuantizedWeight | PackedQuantizedWeight", stats: dict,
                dequantized: torch.Tensor | None = None) -> None:
        """Put a module's quantized weight in place (also how a resumed run restores finished layers)."""
        if dequantized is None:
            dequantized = result.dequantize()
        if not all(math.isfinite(stats.get(k) or 0.0) for k in ("loss", "rtn_loss")) or not torch.isfinite(dequantized).all():
            raise FabricqError(f"{name}: quantization produced NaN/Inf (its Hessian, loss or scales): the layer's "
                               "calibration activations are not finite (float16 overflow?); try model.dtype=float32")
        weight = module.weight.data
        # In place: loaded weights are often a private memory map of the checkpoint file; writing
        # into them replaces those pages, where a new tensor would keep both resident.
        weight.copy_(dequantized.to(device=weight.device, dtype=weight.dtype))
        self.quantized[name] = held(result)  # kept until export
        self.stats[name] = stats
