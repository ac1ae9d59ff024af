"""The one exchange path of a multi-rank solve step, and the collectives around it.

A solver plans a step (`StepPlan`: which rank solves which modules' rows, where each Hessian
total is needed); `Exchange.run` carries it out, the same way for every plan:

1. token totals all-reduced (one blocking collective: waiting in it is "arrival", the slowest
   rank's forwards, not the step's own time);
2. each Hessian's partial sums reduced to where they are solved: to one owner (`reduce`), or to
   every rank (`all_reduce`; or a `broadcast` from the one rank that holds the total already);
3. every rank solves its units, each as soon as its Hessian has arrived;
4. results broadcast from their solvers (codes as a run holds them: packed below 8 bits);
5. per-module stats and each unit's solve seconds gathered;
6. results installed everywhere (row slices joined), in module order;
7. solve seconds observed by the cost model, and the step recorded for report.json.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fabricq.callbacks.solver import GroupQuantizer, Install, LayerState, held
from fabricq.parallel.plan import CostModel, SolveTask
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.packing import packed_width

ALL_RANKS = -1  # a Hessian total every rank holds, or needs
PHASES = ("arrival", "reduce", "solve", "results", "metadata", "install")


@dataclass
class SolveUnit:
    """What one rank solves of a step: modules `names` of one shared-input group, per module its
    `rows` (all of them, or a slice), stacked as one solve (`task`, predicted to take `cost`)."""

    names: list[str]
    rows: list[range]
    owner: int
    task: SolveTask
    cost: float


@dataclass
class StepPlan:
    units: list[SolveUnit]
    destinations: dict[str, int]  # group leader → rank that needs its Hessian total, or ALL_RANKS


@dataclass
class _Piece:
    """A module's rows solved by one unit: its result parts as they travelled."""

    owner: int
    whole: bool
    parts: dict[str, torch.Tensor]


def groups_of(scheme, in_features: int) -> int:
    return 1 if scheme.group_size == -1 else math.ceil(in_features / scheme.group_size)


def result_buffers(rows: int, cols: int, groups: int, device, packed_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Receive buffers of one module's result; `packed_bits`: its codes travel packed as held."""
    if packed_bits:
        codes = {"packed_codes": torch.empty(rows, packed_width(cols, packed_bits), dtype=torch.int32, device=device)}
    else:
        codes = {"codes": torch.empty(rows, cols, dtype=torch.int8, device=device)}
    return {
        **codes,
        "scale": torch.empty(rows, groups, dtype=torch.float32, device=device),
        "zero": torch.empty(rows, groups, dtype=torch.float32, device=device),
        "g_idx": torch.empty(cols, dtype=torch.int32, device=device),
    }


def held_result_parts(qw) -> dict[str, torch.Tensor]:
    """What travels of a result as a run holds it (`held`: codes packed below 8 bits)."""
    codes = {"packed_codes": qw.packed_codes} if isinstance(qw, PackedQuantizedWeight) else {"codes": qw.codes}
    return {**codes, "scale": qw.scale, "zero": qw.zero, "g_idx": qw.g_idx}


def result_from(parts: dict[str, torch.Tensor], cols: int, scheme, info: dict):
    cpu = {k: v.cpu() for k, v in parts.items()}
    if "packed_codes" in cpu:
        return PackedQuantizedWeight(cpu["packed_codes"], cols, cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)
    return QuantizedWeight(cpu["codes"], cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)


def joined_parts(pieces: list[_Piece]) -> dict[str, torch.Tensor]:
    """One module's result parts from its row slices, in row order (g_idx travelled once)."""
    if len(pieces) == 1:
        return pieces[0].parts
    joined = {k: torch.cat([p.parts[k].cpu() for p in pieces]) for k in pieces[0].parts if k != "g_idx"}
    return {**joined, "g_idx": pieces[0].parts["g_idx"]}


def joined_stats(metas: list[dict]) -> dict:
    """A module's stats from its row slices' (objectives add up over rows; the slices ran side by side)."""
    if len(metas) == 1:
        return metas[0]
    stats = dict(metas[0])
    for key in ("loss", "rtn_loss"):
        stats[key] = sum(m[key] for m in metas)
    stats["seconds"] = round(max(m["seconds"] for m in metas), 4)
    return stats


class _Step:
    """One solve step on this rank, stage by stage (`Exchange.run`); `phases`: where its wall
    time went."""

    def __init__(self, exchange: "Exchange", state: LayerState, plan: StepPlan, quantizer: GroupQuantizer,
                 install: Install):
        self.exchange, self.state, self.plan, self.quantizer, self.install = exchange, state, plan, quantizer, install
        self.rank, self.hessians = exchange.rank, state.hessians
        self.started = time.perf_counter()
        self.in_seconds = exchange.cost_model.in_seconds  # what the plan's costs are in
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.transfers: dict[str, tuple] = {}  # leader → (collective, whether the total lands here, token total)
        self.pieces: dict[str, list[_Piece]] = {}  # module → its parts, a piece per unit, in row order
        self.solve_s = [0.0] * len(plan.units)
        self.solved: dict[str, dict] = {}  # module → stats and solver info, of the units solved here
        self.gathered: list[dict] = []

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - start

    def whole(self, unit: SolveUnit) -> bool:
        return all(len(rows) == self.state.targets[n].out_features for n, rows in zip(unit.names, unit.rows))

    def reduce_hessians(self) -> None:
        """Token totals of the Hessians that move, in one blocking collective (it waits for the
        slowest rank to reach this step: "arrival"), then their sums, asynchronously."""
        holders = self.exchange.holders(self.hessians)
        moves = [(leader, dest) for leader, dest in self.plan.destinations.items()
                 if holders.get(leader) not in (ALL_RANKS, dest)]
        with self.timed("arrival"):
            tokens = torch.tensor([self.hessians.accumulators[leader].tokens if holders.get(leader) in (None, self.rank)
                                   else 0 for leader, _ in moves], dtype=torch.int64, device=self.exchange.device)
            if moves:
                torch.distributed.all_reduce(tokens)
        for (leader, dest), total in zip(moves, tokens.tolist()):
            work, here = self.exchange.send_hessian(self.hessians.accumulators[leader].partial_sum, leader, dest, holders)
            self.transfers[leader] = (work, here, total)

    def receive(self, leader: str) -> None:
        """Wait for a Hessian's transfer (once); where the total landed, record its token count."""
        if leader in self.transfers:
            work, here, total = self.transfers.pop(leader)
            work.wait()
            if here:
                self.hessians.accumulators[leader].install_total(total)

    def solve_and_broadcast(self) -> None:
        """Unit by unit, in plan order (every rank issues the same broadcasts in the same order):
        solve it if it is this rank's, as soon as its Hessian is in, then broadcast its results."""
        broadcasts = []
        for u, unit in enumerate(self.plan.units):
            modules = [self.state.targets[n] for n in unit.names]
            kept = [None] * len(modules)
            if unit.owner == self.rank:
                with self.timed("reduce"):
                    self.receive(self.hessians.leader[unit.names[0]])
                kept = self._solve(u, unit, modules)
            for name, module, rows, result in zip(unit.names, modules, unit.rows, kept):
                parts = self.exchange.broadcast_result(
                    result, unit.owner, len(rows), module.in_features, self.quantizer.scheme_for(module.in_features),
                    broadcasts, with_g_idx=name not in self.pieces)
                self.pieces.setdefault(name, []).append(_Piece(unit.owner, len(rows) == module.out_features, parts))
        with self.timed("results"):
            for leader in list(self.transfers):  # those this rank solved nothing of
                self.receive(leader)
            for work in broadcasts:
                work.wait()

    def _solve(self, u: int, unit: SolveUnit, modules: list) -> list:
        """This rank's unit `u`: its results as a run holds them (modules solved whole installed
        now, so that their dense weights are not held until the step's end)."""
        start = time.perf_counter()
        weights = [m.weight.data[rows.start : rows.stop] for m, rows in zip(modules, unit.rows)]
        kept = []
        solved = self.quantizer.solve(unit.names, weights, self.hessians)
        for name, module, weight, (result, stats, dequantized) in zip(unit.names, modules, weights, solved):
            kept.append(held(result))
            self.solved[name] = {"stats": stats, "info": result.info}
            if weight.shape[0] == module.out_features:  # all its rows
                self.install(name, module, kept[-1], stats, dequantized)
        self.solve_s[u] = time.perf_counter() - start
        self.phases["solve"] += self.solve_s[u]
        return kept

    def gather_metadata(self) -> None:
        """Every rank's per-module stats and solver info, and its units' solve seconds."""
        with self.timed("metadata"):
            own = {"modules": self.solved,
                   "solve_s": {u: s for u, s in enumerate(self.solve_s) if self.plan.units[u].owner == self.rank}}
            self.gathered = [None] * self.exchange.world_size
            torch.distributed.all_gather_object(self.gathered, own)
            self.exchange.bytes["metadata"] += len(repr(own))
        for part in self.gathered:
            for u, seconds in part["solve_s"].items():
                self.solve_s[u] = seconds

    def install_received(self) -> None:
        """Install what was solved elsewhere, and modules solved in row slices (joined), in module order."""
        with self.timed("install"):
            for name, pieces in self.pieces.items():
                if len(pieces) == 1 and pieces[0].whole and pieces[0].owner == self.rank:
                    continue  # installed at its solve
                module = self.state.targets[name]
                metas = [self.gathered[p.owner]["modules"][name] for p in pieces]
                result = result_from(joined_parts(pieces), module.in_features,
                                     self.quantizer.scheme_for(module.in_features), metas[0]["info"])
                self.install(name, module, result, joined_stats([m["stats"] for m in metas]), None)


class Exchange:
    """Carries out solve steps across the ranks of the default process group; keeps the cost
    model, the bytes sent and the per-step report, and where each Hessian total lives."""

    def __init__(self, rank: int, world_size: int, device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.cost_model = CostModel()
        self.layers: list[dict] = []
        self.bytes = {"hessian_reduce": 0, "result_broadcast": 0, "metadata": 0}
        # Per layer's Hessians: leader → rank holding the group's total (or ALL_RANKS); absent
        # while every rank holds only its partial sum.
        self._holders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def holders(self, hessians) -> dict[str, int]:
        return self._holders.setdefault(hessians, {})

    def run(self, state: LayerState, plan: StepPlan, quantizer: GroupQuantizer, install: Install) -> None:
        """Carry out one solve step (the module docstring's stages, in order) and record it."""
        step = _Step(self, state, plan, quantizer, install)
        step.reduce_hessians()
        step.solve_and_broadcast()
        step.gather_metadata()
        step.install_received()
        planned, achieved, groups = [0.0] * self.world_size, [0.0] * self.world_size, []
        for unit, seconds in zip(plan.units, step.solve_s):
            self.cost_model.observe(unit.task, seconds)
            planned[unit.owner] += unit.cost
            achieved[unit.owner] += seconds
            entry = {"modules": unit.names, "cols": unit.task.cols, "rows": list(unit.task.rows), "owner": unit.owner,
                     "planned": round(unit.cost, 6 if step.in_seconds else 0), "solve_s": round(seconds, 4)}
            if not step.whole(unit):
                entry["rows_slice"] = [[rows.start, rows.stop] for rows in unit.rows]
            groups.append(entry)
        self._record_step(state.index, groups, planned, achieved, step.in_seconds,
                          time.perf_counter() - step.started, step.phases)

    def send_hessian(self, payload: torch.Tensor, leader: str, dest: int, holders: dict[str, int]):
        """Start moving a Hessian's sums to `dest`; returns the collective and whether this rank
        then holds the total."""
        dist, holder = torch.distributed, holders.get(leader)
        nbytes = payload.numel() * payload.element_size()
        if holder is not None:  # one rank holds the total already (it solved another member): it sends it
            work = dist.broadcast(payload, src=holder, async_op=True)
            self.bytes["hessian_reduce"] += nbytes * (self.world_size - 1) if holder == self.rank else 0
            holders[leader] = ALL_RANKS
        elif dest == ALL_RANKS:  # partial sums everywhere, every rank needs the total
            work = dist.all_reduce(payload, async_op=True)
            self.bytes["hessian_reduce"] += nbytes
            holders[leader] = ALL_RANKS
        else:  # to its owner only
            work = dist.reduce(payload, dst=dest, async_op=True)
            self.bytes["hessian_reduce"] += nbytes if dest != self.rank else 0
            holders[leader] = dest
        return work, holders[leader] in (ALL_RANKS, self.rank)

    def broadcast_result(self, qw, src: int, rows: int, cols: int, scheme, works: list, *,
                   with_g_idx: bool) -> dict[str, torch.Tensor]:
        """One module's (or row slice's) result from rank `src` to every rank: the source sends `qw`
        as a run holds it (`held`), the others receive into matching buffers. The collectives are
        appended to `works`; returns the buffers."""
        if src == self.rank:
            bufs = {k: v.to(self.device) for k, v in held_result_parts(qw).items()}
        else:
            bufs = result_buffers(rows, cols, groups_of(scheme, cols), self.device,
                                  scheme.bits if scheme.bits < 8 else None)
        if not with_g_idx:  # g_idx depends on the Hessian alone: one copy per module travels
            del bufs["g_idx"]
        works += [torch.distributed.broadcast(b, src=src, async_op=True) for b in bufs.values()]
        if src == self.rank:
            self.bytes["result_broadcast"] += sum(b.numel() * b.element_size() for b in bufs.values()) * (self.world_size - 1)
        return bufs

    def _record_step(self, index: int, groups: list[dict], planned: list[float], achieved: list[float],
                     planned_in_seconds: bool, wall_s: float, phases: dict[str, float]) -> None:
        """Add one solve step to the current layer's report entry. A layer solved in several steps
        (true-sequential gates) waits for each step's slowest rank, so its makespan is the sum of
        the steps' makespans. `phases`: where this rank's wall time of the step went (`PHASES`;
        install: of results solved elsewhere, once the metadata is in)."""
        entry = self.layers[-1] if self.layers and self.layers[-1]["layer"] == index else None
        if entry is None:
            entry = {"layer": index, "groups": [], "steps": 0,
                     "planned_unit": "s" if planned_in_seconds else "analytic (cols³ + Σ rows·cols²)",
                     "planned_per_rank": [0.0] * self.world_size, "planned_makespan": 0.0,
                     "achieved_per_rank_s": [0.0] * self.world_size, "achieved_makespan_s": 0.0, "wall_s": 0.0}
            self.layers.append(entry)
        entry["groups"] += groups
        entry["steps"] += 1
        entry["planned_per_rank"] = [a + b for a, b in zip(entry["planned_per_rank"], planned)]
        entry["planned_makespan"] += max(planned)
        entry["achieved_per_rank_s"] = [round(a + b, 4) for a, b in zip(entry["achieved_per_rank_s"], achieved)]
        entry["achieved_makespan_s"] = round(entry["achieved_makespan_s"] + max(achieved), 4)
        entry["wall_s"] = round(entry["wall_s"] + wall_s, 4)
        entry["phases_s"] = {k: round(entry.get("phases_s", {}).get(k, 0.0) + v, 4) for k, v in phases.items()}
        planned_total, achieved_total = sum(entry["planned_per_rank"]), sum(entry["achieved_per_rank_s"])
        entry["planned_makespan_over_ideal"] = (entry["planned_makespan"] / (planned_total / self.world_size)
                                                if planned_total else 1.0)
        entry["achieved_makespan_over_ideal"] = (entry["achieved_makespan_s"] / (achieved_total / self.world_size)
                                                 if achieved_total else 1.0)

    @property
    def report(self) -> dict:
        return {"world_size": self.world_size, "bytes_sent": dict(self.bytes), "layers": self.layers}


def gather_totals(fabric, bytes_sent: dict[str, int]) -> dict:
    """Bytes sent, summed over ranks (`bytes_sent`: this rank's), and each rank's CPU seconds so
    far (how evenly the work was shared)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    mine = {"bytes": bytes_sent, "cpu_s": usage.ru_utime + usage.ru_stime}
    parts = [None] * fabric.world_size
    torch.distributed.all_gather_object(parts, mine)
    return {
        "bytes_sent": {k: sum(p["bytes"][k] for p in parts) for k in parts[0]["bytes"]},
        "cpu_s_per_rank": [round(p["cpu_s"], 2) for p in parts],
    }


def agreed_finished_layer(finished: int | None, device) -> int | None:
    """With several ranks: the last layer that every rank finished (a peer is at most one layer
    behind, and each rank keeps the markers and hidden states of the layer before its latest:
    `WorkDirectory.release_older`)."""
    value = torch.tensor([-1 if finished is None else finished], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    agreed = int(value.item())
    return None if agreed < 0 else agreed
