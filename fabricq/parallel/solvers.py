"""Data-parallel calibration and GPTQ across ranks (Lightning Fabric processes, torch.distributed
collectives), balanced by the cost of the GPTQ solves.

How a run with N ranks works (N = trainer.devices × trainer.num_nodes):

1. Every rank loads the model and the same calibration windows. The windows are cut into the very
   micro-batches a one-rank run forwards (`data.batch_size`), and whole batches are dealt to ranks
   in contiguous, disjoint ranges (`shard_batches`): every forward pass is bit-identical to the
   one-rank run's, only the order in which Hessian partial sums are added differs.
2. Per decoder layer, each rank accumulates partial Hessian *sums* (one per shared-input group:
   q/k/v, o, gate/up, down) over its batches.
3. At each solve step (a layer's end, or a true-sequential gate) a solver plans who solves what:
   `OwnerSolver` when the step has a group per rank — a cost model (`CostModel`: analytic until
   measured, then the measured seconds of the same shapes, gathered so that all ranks plan
   identically) predicts each group's GPTQ time, `assign_to_ranks` places the groups on ranks
   minimising the step's makespan, and each group's sum is reduced to its owner only;
   `RowSliceSolver` when it has fewer (a gate: one group) — every rank gets the group's total
   and solves a 64-row-aligned slice of its modules' stacked rows.
4. `Exchange.run` carries out either plan (fabricq.parallel.exchange): results are broadcast, so
   every rank installs the same quantized weights and continues error propagation on its own
   batches.

The cost model and the assignment are pure functions (no torch.distributed): unit-tested against
brute force and simulated on Llama-3 shapes in `benchmarks/assignment_sim.py`.
"""

from __future__ import annotations

from fabricq.callbacks.solver import GPTQSettings, GroupQuantizer, Install, LayerState, LocalSolver, Solver
from fabricq.parallel.exchange import ALL_RANKS, Exchange, SolveUnit, StepPlan
from fabricq.parallel.plan import SolveTask, assign_to_ranks, split_stacked_rows


class _PlannedSolver(Solver):
    """A multi-rank solver: plans each step, and the shared `exchange` carries it out."""

    def __init__(self, quantizer: GroupQuantizer, exchange: Exchange):
        super().__init__(quantizer)
        self.exchange = exchange

    def plan(self, state: LayerState, groups: list[list[str]]) -> StepPlan:
        raise NotImplementedError

    def solve(self, state: LayerState, groups: list[list[str]], install: Install) -> None:
        self.exchange.run(state, self.plan(state, groups), self.quantizer, install)


class OwnerSolver(_PlannedSolver):
    """Each group's Hessian sum is reduced to one owner rank, chosen by the cost model to balance
    the step; owners solve their groups whole. (A total that an earlier step of the layer left on
    another rank is broadcast from there: `Exchange`.)"""

    def plan(self, state, groups):
        exchange = self.exchange
        tasks = [SolveTask(state.targets[g[0]].in_features, tuple(state.targets[n].out_features for n in g))
                 for g in groups]
        costs = [exchange.cost_model.predict(t) for t in tasks]
        owners = assign_to_ranks(costs, exchange.world_size)
        units = [SolveUnit(names, [range(state.targets[n].out_features) for n in names], owner, task, cost)
                 for names, owner, task, cost in zip(groups, owners, tasks, costs)]
        destinations: dict[str, int] = {}
        for names, owner in zip(groups, owners):
            destinations.setdefault(state.hessians.leader[names[0]], owner)
        return StepPlan(units, destinations)


class RowSliceSolver(_PlannedSolver):
    """Every rank gets each group's Hessian total and solves a slice of the group's rows — its
    modules' rows stacked, as one rank solves them, split evenly (`split_stacked_rows`): rows are
    independent given the Hessian, so only the factorisation and the per-column loop are
    repeated on each rank, and the joined slices equal the one-rank solve bit for bit."""

    def plan(self, state, groups):
        exchange = self.exchange
        units = []
        for group in groups:
            cols = state.targets[group[0]].in_features
            per_module = split_stacked_rows([state.targets[n].out_features for n in group], exchange.world_size)
            for rank in range(exchange.world_size):
                slices = [(name, ranges[rank]) for name, ranges in zip(group, per_module) if len(ranges[rank])]
                if slices:
                    task = SolveTask(cols, tuple(len(rows) for _, rows in slices))
                    units.append(SolveUnit([n for n, _ in slices], [rows for _, rows in slices], rank, task,
                                           exchange.cost_model.predict(task)))
        return StepPlan(units, {state.hessians.leader[g[0]]: ALL_RANKS for g in groups})


class MultiRankSolver(Solver):
    """Several ranks: a step with at least one group per rank goes to owners (`OwnerSolver`), one
    with fewer groups (a true-sequential gate) is split by rows (`RowSliceSolver`). `report`:
    per solve step, the units, planned and achieved per-rank solve time, makespans, where the
    step's time went, and bytes sent."""

    def __init__(self, settings: GPTQSettings, rank: int, world_size: int, device):
        super().__init__(GroupQuantizer(settings))
        self.exchange = Exchange(rank, world_size, device)
        self.by_owner = OwnerSolver(self.quantizer, self.exchange)
        self.by_rows = RowSliceSolver(self.quantizer, self.exchange)

    def solve(self, state, groups, install):
        solver = self.by_owner if len(groups) >= self.exchange.world_size else self.by_rows
        solver.solve(state, groups, install)

    @property
    def report(self) -> dict:
        return self.exchange.report


def make_solver(settings: GPTQSettings, world_size: int, rank: int, device) -> Solver:
    """The solver of a run: every group solved here on one rank (and for round-to-nearest, which
    needs no Hessians: each rank rounds every module), shared out otherwise."""
    if world_size == 1 or settings.method != "gptq":
        return LocalSolver(settings)
    return MultiRankSolver(settings, rank, world_size, device)
