"""Solving the shared-input groups of a layer: the quantization of one group (`GroupQuantizer`),
and how a solve step's groups are shared out (`Solver`): `LocalSolver` solves every group here;
the multi-rank solvers are in `fabricq.parallel.solvers`.

A solve step is the groups `GPTQCallback` has ready at once: every group of a layer at its end,
or one group at a gate of a true-sequential forward.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.quant.fold import HeadLayout, head_order
from fabricq.quant.gptq import PackedQuantizedWeight, PreparedHessian, QuantizedWeight, gptq_solve, layer_objectives, prepare_hessian, rtn_quantize
from fabricq.quant.grid import QuantScheme, effective_group_size

# A stacked solve holds a few (rows, columns) float32 buffers of the whole stack at once (the
# weights, per-column scales and zeros, codes): groups whose weights exceed this many elements
# (256 MiB in float32; e.g. gate/up of an 8B model) are solved in consecutive batches of modules —
# at such row counts the per-column loop that stacking saves is small next to the rows' work.
STACKED_SOLVE_ELEMENTS = 1 << 26

log = logging.getLogger("fabricq")


@dataclass
class GPTQSettings:
    method: str = "gptq"  # "gptq" or "rtn"
    scheme: QuantScheme = QuantScheme()
    damp: float = 0.01
    block_size: int = 128
    hessian_dtype: torch.dtype = torch.float32
    ignore: tuple[str, ...] = ()  # regexes of module names left unquantized
    solve_threads: int = 1  # shared-input groups of a step solved concurrently (results do not depend on it)
    # Quantize each shared-input group of a layer (q/k/v, o, gate/up, down) before the next one
    # is calibrated, in one gated forward per layer (see fabricq.calibration.gated); False:
    # calibrate every module of a layer on the unquantized layer, then forward it again.
    true_sequential: bool = False
    # Scales are rounded to this dtype while solving, so the export stores them exactly (the
    # export's scale dtype, fabricq.checkpoint.engines.scale_dtype_for); None: each weight's own dtype.
    scale_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class ModuleOrder:
    """How one module is solved under folded act-order (`fabricq.quant.fold`): "dynamic" (groups
    follow the solve order, folded into contiguous groups once the layer is solved) or "static";
    `heads`: o_proj's solve order is `head_order` of this layout instead of the descending diagonal."""

    actorder: str
    heads: HeadLayout | None = None


STATIC_ORDER = ModuleOrder("static")


@dataclass
class LayerState:
    """What GPTQCallback knows about one decoder layer between its start and its end."""

    index: int
    targets: dict[str, nn.Linear]  # full module name → module
    hessians: SharedInputHessians | None = None  # None for round-to-nearest
    solved: set[str] = field(default_factory=set)


# Called by solvers for every module they solved: (name, module, result, stats, dequantized or None).
Install = Callable[[str, nn.Linear, "QuantizedWeight | PackedQuantizedWeight", dict, "torch.Tensor | None"], None]
# Per module: its result, stats, and dequantized weight (None for round-to-nearest).
Solved = tuple[QuantizedWeight, dict, "torch.Tensor | None"]


@dataclass
class _SharedPreparation:
    """A shared-input group's mean Hessian and its GPTQ preparation, until every member has it."""

    waiting: set[str]  # members that have not fetched it yet
    lock: threading.Lock = field(default_factory=threading.Lock)
    value: tuple[torch.Tensor, PreparedHessian] | None = None


class GroupQuantizer:
    """Quantizes the modules of one shared-input group: GPTQ on their shared Hessian, or
    round-to-nearest. Thread-safe: groups of a step may be solved concurrently."""

    def __init__(self, settings: GPTQSettings):
        self.settings = settings
        # Prepared Hessians of the layer being solved (see `_prepared_hessian`).
        self._prepared: dict[str, _SharedPreparation] = {}
        self._prepared_for: weakref.ref | None = None
        self._prepared_lock = threading.Lock()
        # Folded act-order: module → how it is solved, set by GPTQCallback for the layer being
        # solved (every rank sets the same); modules absent are solved static.
        self.orders: dict[str, ModuleOrder] = {}

    def scheme_for(self, in_features: int, name: str | None = None) -> QuantScheme:
        """A module's grid: the run's scheme at its effective group size; under folded
        act-order, with module `name`'s own act-order (without a name it stays "folded")."""
        base = self.settings.scheme
        scheme = replace(base, group_size=effective_group_size(base.group_size, in_features))
        if base.actorder == "folded" and name is not None:
            scheme = replace(scheme, actorder=self.orders.get(name, STATIC_ORDER).actorder)
        return scheme

    @property
    def prepared_groups(self) -> int:
        """Groups whose prepared Hessian is held, waiting for members that have not been solved."""
        return len(self._prepared)

    def solve(self, names: list[str], weights: list[torch.Tensor], hessians: SharedInputHessians | None
              ) -> list[Solved]:
        """Quantize the `weights` of modules `names` that share one input (q/k/v, gate/up, or a
        single module; with `hessians` None, round-to-nearest): per module, its result, stats,
        and the dequantized weight (GPTQ only).

        GPTQ solves the modules as one matrix, their rows stacked: rows are independent given the
        Hessian, so each module gets its own solve's result (bit for bit on the CPUs tested), but
        the column-by-column loop, whose cost hardly depends on the rows, runs once per group
        instead of once per module. Each module's `seconds` is its share (by rows) of the joint
        solve plus its own report objectives."""
        start = time.perf_counter()
        scheme = self.scheme_for(weights[0].shape[1], names[0])
        if len({self.orders.get(n, STATIC_ORDER) for n in names}) > 1:
            # Members of one shared input solved in different orders: not a layout the folding
            # plans (o_proj, down_proj read inputs of their own); static is always exact.
            log.warning("%s share an input but not a folded act-order: solved static", ", ".join(names))
            scheme = replace(scheme, actorder="static")
        if hessians is None:
            solved = []
            for weight in weights:
                began = time.perf_counter()
                result = rtn_quantize(weight, scheme, self.settings.scale_dtype or weight.dtype)
                solved.append((result, _module_stats(result, scheme, {}, time.perf_counter() - began), None))
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
                    for s in self.solve([names[i] for i in batch], [weights[i] for i in batch], hessians)]
        h, prepared = self._prepared_hessian(names, hessians, scheme)
        rows = [w.shape[0] for w in weights]
        joint = gptq_solve(
            weights[0] if len(weights) == 1 else torch.cat(weights), prepared, scheme,
            block_size=self.settings.block_size, scale_dtype=self.settings.scale_dtype or weights[0].dtype,
            name=", ".join(names),
        )
        results = joint.split_rows(rows) if len(weights) > 1 else [joint]
        shared_s = time.perf_counter() - start
        tokens = hessians.accumulators[hessians.leader[names[0]]].tokens
        solved = []
        for weight, result, n_rows in zip(weights, results, rows):
            began = time.perf_counter()
            dequantized = result.dequantize().to(weight.device)  # reused for the new weight
            rtn = rtn_quantize(weight, scheme, self.settings.scale_dtype or weight.dtype).dequantize().to(weight.device)
            loss, rtn_loss = layer_objectives(weight, [dequantized, rtn], h)
            seconds = time.perf_counter() - began + shared_s * n_rows / sum(rows)
            stats = {"loss": loss, "rtn_loss": rtn_loss, "tokens": tokens}
            if self.settings.scheme.actorder == "folded":
                stats["actorder"] = scheme.actorder  # what folded act-order solved this module with
            solved.append((result, _module_stats(result, scheme, stats, seconds), dequantized))
        return solved

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
                heads = self.orders.get(names[0], STATIC_ORDER).heads if scheme.actorder == "dynamic" else None
                order = None if heads is None else head_order(h.diagonal(), heads)
                entry.value = (h, prepare_hessian(h, scheme.actorder, damp=self.settings.damp, order=order))
            value = entry.value
        with self._prepared_lock:
            entry.waiting.difference_update(names)
            if not entry.waiting and self._prepared.get(leader) is entry:
                del self._prepared[leader]
        return value


def _module_stats(result: QuantizedWeight, scheme: QuantScheme, stats: dict, seconds: float) -> dict:
    return {
        **stats,
        "method": result.info.get("method"),
        "damp": result.info.get("damp"),
        "group_size": scheme.group_size,
        "seconds": round(seconds, 4),
    }


def held(result: QuantizedWeight | PackedQuantizedWeight) -> QuantizedWeight | PackedQuantizedWeight:
    """A result as a run keeps it until export: codes packed below 8 bits (half of int8's bytes)."""
    if isinstance(result, QuantizedWeight) and result.scheme.bits < 8:
        return result.packed()
    return result


def quantize_and_install(quantizer: GroupQuantizer, names: list[str], modules: list[nn.Linear],
                         hessians: SharedInputHessians | None, install: Install) -> None:
    """Quantize the modules of one group here and install each."""
    solved = quantizer.solve(names, [m.weight.data for m in modules], hessians)
    for name, module, (result, stats, dequantized) in zip(names, modules, solved):
        install(name, module, result, stats, dequantized)


class Solver:
    """Quantizes the groups of a solve step: `solve` calls `install` once for every module of
    `groups` (lists of modules sharing a Hessian) of layer `state`, in any order. `report`: what
    a multi-rank solver tells report.json (None here)."""

    report: dict | None = None

    def __init__(self, quantizer: GroupQuantizer):
        self.quantizer = quantizer

    def solve(self, state: LayerState, groups: list[list[str]], install: Install) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a run that failed midway included)."""


class LocalSolver(Solver):
    """One rank: every group is solved here, `settings.solve_threads` groups at a time (groups of
    a step are independent; torch releases the GIL inside their solves)."""

    def __init__(self, settings: GPTQSettings):
        super().__init__(GroupQuantizer(settings))
        self.threads = settings.solve_threads
        self._pool: ThreadPoolExecutor | None = None

    def solve(self, state: LayerState, groups: list[list[str]], install: Install) -> None:
        def one(group: list[str]) -> None:
            quantize_and_install(self.quantizer, group, [state.targets[n] for n in group], state.hessians, install)

        if self.threads > 1 and len(groups) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fabricq-solve")
            list(self._pool.map(one, groups))
        else:
            for group in groups:
                one(group)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
