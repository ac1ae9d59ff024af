"""Data-parallel calibration and GPTQ across ranks (Lightning Fabric processes, torch.distributed
collectives), balanced by the cost of the GPTQ solves.

How a run with N ranks works (N = trainer.devices × trainer.num_nodes):

1. Every rank loads the model and the same calibration windows. The windows are cut into the very
   micro-batches a one-rank run forwards (`data.batch_size`), and whole batches are dealt to ranks
   in contiguous, disjoint ranges (`shard_batches`): every forward pass is bit-identical to the
   one-rank run's, only the order in which Hessian partial sums are added differs.
2. Per decoder layer, each rank accumulates partial Hessian *sums* (one per shared-input group:
   q/k/v, o, gate/up, down) over its batches. A pure cost model (`solve_cost`) predicts each
   group's GPTQ time, `assign_to_ranks` places the groups on ranks minimising the layer's
   makespan, and each group's sum is reduced (`torch.distributed.reduce`, asynchronous) to its
   owner only, never all-reduced.
3. Owners solve; codes, scales, zero points and g_idx are broadcast, so every rank holds the same
   quantized weights and continues error propagation on its own batches.
4. After the first layer, measured solve times (broadcast with the results, so all ranks plan
   identically) replace the analytic cost for modules of the same shape.
5. A step with fewer groups than ranks (a true-sequential gate: one group) splits rows instead:
   every rank gets the group's Hessian and solves a slice of each module's rows.
6. With `pipeline.lag=1`, solves may trail calibration by a window of layers, planned over the
   whole run (`assign_with_backlog`) and solved on a thread per rank.

The cost model and the assignment are pure functions (no torch.distributed): unit-tested against
brute force and simulated on Llama-3 shapes in `benchmarks/assignment_sim.py`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings, LayerState
from fabricq.errors import FabricqError
from fabricq.parallel.exchange import (
    groups_of,
    held_result_parts,
    reduction_payload,
    result_buffers,
    result_from,
    unpack_upper,
)
from fabricq.parallel.plan import (
    CostModel,
    SolveTask,
    assign_to_ranks,
    assign_with_backlog,
    solve_cost,
    split_stacked_rows,
)
from fabricq.quant.gptq import QuantizedWeight

log = logging.getLogger("fabricq")



# ---------------------------------------------------------------------------------------------
# Configuration checks (before any process is launched)
# ---------------------------------------------------------------------------------------------
























# ---------------------------------------------------------------------------------------------
# Sharding the calibration data
# ---------------------------------------------------------------------------------------------






# ---------------------------------------------------------------------------------------------
# Cost model and assignment (pure)
# ---------------------------------------------------------------------------------------------




















# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


















ALL_RANKS = -2  # a Hessian sum every rank holds (all-reduced)


@dataclass
class _DistributedLayerState(LayerState):
    sum_holder: dict[str, int] = field(default_factory=dict)  # leader → rank holding its summed Hessian (or ALL_RANKS)


@dataclass
class _HandedOutLayer:
    """A layer whose groups went to their owners' solver threads (solve window), until its
    results are published: broadcast and installed on every rank."""

    state: _DistributedLayerState
    groups: list[list[str]]
    tasks: list[SolveTask]
    costs: list[float]
    owners: list[int]
    solves: dict[int, Future]  # group index → this rank's solve of it: ({name: (result, stats)}, seconds)


class DistributedGPTQCallback(GPTQCallback):
    """GPTQCallback whose solves (at the layer end, or at each gate of a true-sequential forward)
    reduce each shared-input Hessian to one owner rank, solve the groups this rank owns, and
    broadcast the results so that every rank applies them all.

    With `solve_window=D` (needs the loop's lag=1, where no layer's calibration waits for an
    earlier layer's quantized weights) a layer's groups are instead handed to their owners'
    solver threads and the loop moves on; the results are published (broadcast, installed
    everywhere) D layers later, or at the last layer. Owners are planned over the whole run
    (`assign_with_backlog`: each rank's planned work carries over), so a rank that drew a
    down_proj sits out the next layers while the others catch up.

    `report` holds, per solve step (one per layer, or one per gate): owners, planned and achieved per-rank solve time, makespans, and
    bytes sent in Hessian reductions and result broadcasts."""

    def __init__(self, settings: GPTQSettings, *, rank: int, world_size: int, device,
                 upper_triangle: bool = False, use_measurements: bool = True, solve_window: int = 0):
        super().__init__(settings)
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.upper_triangle = upper_triangle
        self.cost_model = CostModel(use_measurements=use_measurements)
        self.layers: list[dict] = []
        self.bytes = {"hessian_reduce": 0, "result_broadcast": 0, "metadata": 0}
        self.solve_window = solve_window
        # Solve window: analytic work planned per rank so far (the same on every rank), the layers
        # handed out and not yet published, this rank's solver thread, and the last published layer.
        self._planned_loads = [0.0] * world_size
        self._planned_layers = 0
        self._handed_out: dict[int, _HandedOutLayer] = {}
        self._solver: ThreadPoolExecutor | None = None
        self._published_through = -1
        self._last_layer = -1
        self._publish_wait_s = 0.0
        self._solve_s_per_rank = [0.0] * world_size

    def on_run_start(self, loop):
        self._last_layer = loop.num_layers - 1
        if self.solve_window and not getattr(loop, "lag", 0):
            raise FabricqError("a solve window (trainer.solve_window > 0) needs pipeline.lag=1")
        if self.solve_window and self._gated:
            raise FabricqError("a solve window (trainer.solve_window > 0) needs quant.true_sequential=false")

    def on_run_end(self, loop):
        self.close()

    def close(self) -> None:
        if self._solver is not None:
            self._solver.shutdown(wait=True, cancel_futures=True)
            self._solver = None

    def final_through(self, index: int) -> int:
        return self._published_through if self.solve_window else index

    def _broadcast_result(self, qw, src: int, rows: int, cols: int, n_groups: int, works: list, *,
                          packed_bits: int | None = None, with_g_idx: bool = True) -> dict[str, torch.Tensor]:
        """One module's (or row slice's) result from rank `src` to every rank: the source sends `qw`
        as it is (packed codes stay packed), the others receive into buffers that must match
        (`packed_bits`). The collectives are appended to `works`; returns the buffers."""
        if src == self.rank:
            bufs = {k: v.to(self.device) for k, v in held_result_parts(qw).items()}
        else:
            bufs = result_buffers(rows, cols, n_groups, self.device, packed_bits)
        if not with_g_idx:
            del bufs["g_idx"]
        works += [torch.distributed.broadcast(b, src=src, async_op=True) for b in bufs.values()]
        if src == self.rank:
            self.bytes["result_broadcast"] += sum(b.numel() * b.element_size() for b in bufs.values()) * (self.world_size - 1)
        return bufs

    def _solve_group(self, state: "_DistributedLayerState", names: list[str]) -> float:
        start = time.perf_counter()
        self.quantize_group(names, [state.targets[n] for n in names], state.hessians)
        return time.perf_counter() - start

    def new_layer_state(self, index, targets):
        return _DistributedLayerState(index, targets)

    def solve_groups(self, state: "_DistributedLayerState", groups: list[list[str]]) -> None:
        if self.solve_window:
            self._hand_out(state, groups)
            return
        if len(groups) < self.world_size:
            # Too few groups to keep every rank busy (a true-sequential gate solves one group).
            self._solve_row_slices(state, groups)
            return
        dist = torch.distributed
        hessians = state.hessians
        tick = time.perf_counter()
        tasks = [SolveTask(state.targets[g[0]].in_features, tuple(state.targets[n].out_features for n in g))
                 for g in groups]
        costs = [self.cost_model.predict(t) for t in tasks]
        leaders = [hessians.leader[g[0]] for g in groups]
        # A group whose Hessian sum one rank already holds (a gated first layer solves q, then k,
        # which shares q's input) stays with that rank; the others are balanced.
        owners = [max(state.sum_holder.get(leader, -1), -1) for leader in leaders]  # ALL_RANKS: free
        free = [g for g, owner in enumerate(owners) if owner == -1]
        if free:
            for g, owner in zip(free, assign_to_ranks([costs[g] for g in free], self.world_size)):
                owners[g] = owner
        fresh = list(dict.fromkeys(leaders[g] for g in range(len(groups)) if leaders[g] not in state.sum_holder))
        tokens = torch.tensor([hessians.accumulators[l].tokens for l in fresh], dtype=torch.int64, device=self.device)
        if fresh:
            dist.all_reduce(tokens)  # blocks until the slowest rank has finished its forwards
        phases = {"arrival": time.perf_counter() - tick, "reduce": 0.0, "solve": 0.0}
        pending = {}  # leader → (collective, payload, tokens) still to be waited for and unpacked
        for i, leader in enumerate(fresh):
            acc = hessians.accumulators[leader]
            owner = owners[leaders.index(leader)]  # a group per leader: to its one owner only
            payload = reduction_payload(acc, self.upper_triangle)
            work = dist.reduce(payload, dst=owner, async_op=True)
            state.sum_holder[leader] = owner
            self.bytes["hessian_reduce"] += payload.numel() * payload.element_size() if owner != self.rank else 0
            pending[leader] = (work, payload, int(tokens[i]))
        reduces = {leader: item[0] for leader, item in pending.items()}

        solve_s = [0.0] * len(groups)
        broadcasts, received = [], {}
        for g, (names, owner) in enumerate(zip(groups, owners)):
            if owner == self.rank:
                if leaders[g] in pending:  # the summed Hessian arrives (once per leader)
                    work, payload, total = pending.pop(leaders[g])
                    waited = time.perf_counter()
                    work.wait()
                    phases["reduce"] += time.perf_counter() - waited
                    acc = hessians.accumulators[leaders[g]]
                    if self.upper_triangle:
                        acc.sum = unpack_upper(payload, acc.raw.shape[0])
                    acc.tokens = total
                solve_s[g] = self._solve_group(state, names)
                phases["solve"] += solve_s[g]
            for name in names:
                module = state.targets[name]
                scheme = self.scheme_for(module)
                works = []
                bufs = self._broadcast_result(  # as install holds it: packed below 8 bits
                    self.quantized.get(name), owner, module.out_features, module.in_features,
                    groups_of(scheme, module.in_features), works,
                    packed_bits=scheme.bits if scheme.bits < 8 else None)
                broadcasts += works
                if owner != self.rank:
                    received[name] = (bufs, scheme, works)
        waited = time.perf_counter()
        for work in reduces.values():
            work.wait()
        # Other owners' results, installed as they arrive (while later ones are still being
        # solved); their metadata (method, damping) is filled in below.
        for name, (bufs, scheme, works) in received.items():
            for work in works:
                work.wait()
            module = state.targets[name]
            self.install(name, module, result_from(bufs, module.in_features, scheme, {}), {})
        for work in broadcasts:
            work.wait()
        phases["results"] = time.perf_counter() - waited
        # Small per-module metadata (method, damping, objectives, solve seconds) from each owner.
        mine = {
            "stats": {n: self.stats[n] for g, names in enumerate(groups) if owners[g] == self.rank for n in names},
            "info": {n: self.quantized[n].info for g, names in enumerate(groups) if owners[g] == self.rank for n in names},
            "solve_s": {g: solve_s[g] for g in range(len(groups)) if owners[g] == self.rank},
        }
        waited = time.perf_counter()
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        self.bytes["metadata"] += len(repr(mine))
        phases["metadata"] = time.perf_counter() - waited
        for part in gathered:
            for g, seconds in part["solve_s"].items():
                solve_s[g] = seconds
            for name, stats in part["stats"].items():
                if name in received:
                    self.quantized[name].info.update(part["info"][name])
                    self.stats[name] = stats

        planned_in_seconds = self.cost_model.in_seconds
        for task, seconds in zip(tasks, solve_s):
            self.cost_model.observe(task, seconds)
        achieved = [0.0] * self.world_size
        planned = [0.0] * self.world_size
        for c, s, r in zip(costs, solve_s, owners):
            planned[r] += c
            achieved[r] += s
        groups_report = [{"modules": names, "cols": t.cols, "rows": list(t.rows), "owner": r,
                          "planned": round(c, 6 if planned_in_seconds else 0), "solve_s": round(s, 4)}
                         for names, t, c, s, r in zip(groups, tasks, costs, solve_s, owners)]
        self._record_step(state.index, groups_report, planned, achieved, planned_in_seconds,
                          time.perf_counter() - tick, phases)
        state.solved.update(n for names in groups for n in names)

    def _solve_row_slices(self, state: "_DistributedLayerState", groups: list[list[str]]) -> None:
        """Every rank gets each group's summed Hessian (all-reduced, once per layer) and solves a
        slice of the group's rows — its modules' rows stacked, as one rank solves them, split
        evenly (`split_stacked_rows`): rows are independent given the Hessian, so only the factorisation
        and the per-column loop are repeated on each rank. The slices are broadcast and joined;
        each module's objectives are the sums of its slices'."""
        dist = torch.distributed
        hessians = state.hessians
        tick = time.perf_counter()
        leaders = [leader for leader in dict.fromkeys(hessians.leader[g[0]] for g in groups)
                   if state.sum_holder.get(leader) != ALL_RANKS]  # those every rank holds need nothing
        # Token totals first, in one blocking collective: it waits for the slowest rank to reach
        # this step ("arrival": calibration imbalance, not part of the solve step). A rank holding
        # a total already (it solved another member of the group) gives it, the others nothing.
        holders = [state.sum_holder.get(leader) for leader in leaders]
        tokens = torch.tensor([hessians.accumulators[leader].tokens if holder in (None, self.rank) else 0
                               for leader, holder in zip(leaders, holders)], dtype=torch.int64, device=self.device)
        if leaders:
            dist.all_reduce(tokens)
        phases = {"arrival": time.perf_counter() - tick}
        works = []
        for i, (leader, holder) in enumerate(zip(leaders, holders)):
            acc = hessians.accumulators[leader]
            acc.tokens = int(tokens[i])
            payload = reduction_payload(acc, self.upper_triangle)
            if holder is None:  # partial sums everywhere: every rank needs the total
                works.append((leader, dist.all_reduce(payload, async_op=True), payload))
            else:  # one rank holds the total already (solved another member before): it sends it
                works.append((leader, dist.broadcast(payload, src=holder, async_op=True), payload))
            self.bytes["hessian_reduce"] += payload.numel() * payload.element_size()
            state.sum_holder[leader] = ALL_RANKS
        for leader, work, payload in works:
            work.wait()
            if self.upper_triangle:
                acc = hessians.accumulators[leader]
                acc.sum = unpack_upper(payload, acc.raw.shape[0])
        phases["reduce"] = time.perf_counter() - tick - phases["arrival"]

        names = [n for g in groups for n in g]
        slices = {}  # module → its rows each rank solves (ranges within the module, maybe empty)
        for group in groups:
            per_module = split_stacked_rows([state.targets[n].out_features for n in group], self.world_size)
            slices.update(zip(group, per_module))
        solved, seconds = {}, {}
        start = time.perf_counter()
        for group in groups:  # this rank's slices of a group's modules, solved stacked
            mine = [n for n in group if len(slices[n][self.rank])]
            weights = [state.targets[n].weight.data[slices[n][self.rank].start : slices[n][self.rank].stop] for n in mine]
            for name, (result, stats, _) in zip(mine, self.solve_modules(mine, weights, hessians) if mine else []):
                solved[name] = (result, stats)
                seconds[name] = stats["seconds"]
        phases["solve"] = time.perf_counter() - start
        parts, broadcasts = {}, []
        for name in names:
            module = state.targets[name]
            n_groups = groups_of(self.scheme_for(module), module.in_features)
            first = next(r for r, rows in enumerate(slices[name]) if len(rows))
            for r, rows in enumerate(slices[name]):
                if len(rows):  # g_idx depends on the Hessian alone: one copy travels
                    parts[name, r] = self._broadcast_result(
                        solved[name][0] if r == self.rank else None, r, len(rows), module.in_features, n_groups,
                        broadcasts, with_g_idx=r == first)
        waited = time.perf_counter()
        for work in broadcasts:
            work.wait()
        phases["results"] = time.perf_counter() - waited
        waited = time.perf_counter()
        mine_meta = {n: {"stats": stats, "info": qw.info, "seconds": seconds[n]} for n, (qw, stats) in solved.items()}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, mine_meta)
        self.bytes["metadata"] += len(repr(mine_meta))
        phases["metadata"] = time.perf_counter() - waited
        waited = time.perf_counter()

        groups_report, planned, achieved = [], [0.0] * self.world_size, [0.0] * self.world_size
        for name in names:
            module = state.targets[name]
            owners = [r for r, rows in enumerate(slices[name]) if len(rows)]
            joined = {k: torch.cat([parts[name, r][k].cpu() for r in owners]) for k in ("codes", "scale", "zero")}
            metas = [gathered[r][name] for r in owners]
            stats = dict(metas[0]["stats"])
            for key in ("loss", "rtn_loss"):
                stats[key] = sum(m["stats"][key] for m in metas)
            stats["seconds"] = round(max(m["seconds"] for m in metas), 4)  # the slices ran side by side
            qw = QuantizedWeight(joined["codes"], joined["scale"], joined["zero"], parts[name, owners[0]]["g_idx"].cpu(),
                                 self.scheme_for(module), metas[0]["info"])
            self.install(name, module, qw, stats)
            for r in owners:
                rows = slices[name][r]
                cost = self.cost_model.predict(SolveTask(module.in_features, (len(rows),)))
                planned[r] += cost
                achieved[r] += gathered[r][name]["seconds"]
                groups_report.append({"modules": [name], "rows_slice": [rows.start, rows.stop], "cols": module.in_features,
                                      "rows": [len(rows)], "owner": r, "planned": round(cost, 6 if self.cost_model.in_seconds else 0),
                                      "solve_s": round(gathered[r][name]["seconds"], 4)})
        phases["install"] = time.perf_counter() - waited
        self._record_step(state.index, groups_report, planned, achieved, self.cost_model.in_seconds,
                          time.perf_counter() - tick, phases)
        state.solved.update(names)

    # -- solve window ----------------------------------------------------------------------------

    def _hand_out(self, state: "_DistributedLayerState", groups: list[list[str]]) -> None:
        """Reduce each group's Hessian to the owner `assign_with_backlog` picks and queue this
        rank's groups on its solver thread (on the lag worker: the next layer is being calibrated
        meanwhile); `on_layer_end` then publishes the layers that are due."""
        dist = torch.distributed
        hessians = state.hessians
        tasks = [SolveTask(state.targets[g[0]].in_features, tuple(state.targets[n].out_features for n in g))
                 for g in groups]
        # Analytic costs: a plan that depends only on shapes is the same on every rank and in a
        # resumed run, whose plan of the layers before it is replayed here (their shapes are this
        # layer's in the decoder stacks fabricq supports; if not, only the owners differ).
        costs = [solve_cost(t) for t in tasks]
        while self._planned_layers < state.index:
            assign_with_backlog(costs, self._planned_loads)
            self._planned_layers += 1
        owners = assign_with_backlog(costs, self._planned_loads)
        self._planned_layers = state.index + 1
        leaders = [hessians.leader[g[0]] for g in groups]
        tokens = torch.tensor([hessians.accumulators[l].tokens for l in leaders], dtype=torch.int64, device=self.device)
        dist.all_reduce(tokens)
        reduces = []
        for leader, owner in zip(leaders, owners):
            acc = hessians.accumulators[leader]
            payload = reduction_payload(acc, self.upper_triangle)
            reduces.append((dist.reduce(payload, dst=owner, async_op=True), payload))
            self.bytes["hessian_reduce"] += payload.numel() * payload.element_size() if owner != self.rank else 0
        for g, ((work, payload), leader, owner) in enumerate(zip(reduces, leaders, owners)):
            work.wait()
            if owner == self.rank:
                acc = hessians.accumulators[leader]
                if self.upper_triangle:
                    acc.sum = unpack_upper(payload, acc.raw.shape[0])
                acc.tokens = int(tokens[g])
            else:  # what `reduce` left here is garbage: free it now, not when the layer is published
                del hessians.accumulators[leader]
        del reduces, payload
        if self._solver is None:
            self._solver = ThreadPoolExecutor(1, thread_name_prefix="fabricq-solver")
        solves = {g: self._solver.submit(self._solve_owned, state, names)
                  for g, (names, owner) in enumerate(zip(groups, owners)) if owner == self.rank}
        self._handed_out[state.index] = _HandedOutLayer(state, groups, tasks, costs, owners, solves)
        state.solved.update(n for names in groups for n in names)

    def on_layer_end(self, loop, index, layer) -> bool:
        changed = super().on_layer_end(loop, index, layer)
        if self.solve_window:  # publish what is due: D layers back, or everything at the last layer
            if index >= self._last_layer and len(self._handed_out) > 1:
                log.info("Waiting for the solves of the last %d layers (solve window)", len(self._handed_out))
            for k in sorted(self._handed_out):
                if index >= self._last_layer or k <= index - self.solve_window:
                    self._publish(k)
            self._published_through = min(self._handed_out, default=index + 1) - 1
        return changed

    def _solve_owned(self, state: "_DistributedLayerState", names: list[str]):
        """On this rank's solver thread: GPTQ of one owned group. The layer may have left the
        compute device meanwhile, so its weights are fetched; nothing is installed here (the lag
        worker does that when publishing, when no other thread touches the layer)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        start = time.perf_counter()
        with torch.no_grad():
            weights = [state.targets[n].weight.data.to(self.device) for n in names]
            results = {n: (result, stats) for n, (result, stats, _) in
                       zip(names, self.solve_modules(names, weights, state.hessians))}
        state.hessians.accumulators.pop(state.hessians.leader[names[0]], None)  # solved: free it
        if self.device.type == "cuda":  # the results are read by the lag worker's broadcasts
            torch.cuda.current_stream(self.device).synchronize()
        return results, time.perf_counter() - start

    def _publish(self, index: int) -> None:
        """Broadcast layer `index`'s results from their owners (each waits for its solver thread
        first) and install them on every rank."""
        dist = torch.distributed
        layer = self._handed_out.pop(index)
        tick = time.perf_counter()
        mine, solve_s = {}, [0.0] * len(layer.groups)
        for g, future in layer.solves.items():
            results, solve_s[g] = future.result()  # a failed solve raises here
            mine.update(results)
        self._publish_wait_s += time.perf_counter() - tick
        received, broadcasts = {}, []
        for names, owner in zip(layer.groups, layer.owners):
            for name in names:
                module = layer.state.targets[name]
                bufs = self._broadcast_result(
                    mine[name][0] if owner == self.rank else None, owner, module.out_features, module.in_features,
                    groups_of(self.scheme_for(module), module.in_features), broadcasts)
                if owner != self.rank:
                    received[name] = bufs
        for work in broadcasts:
            work.wait()
        own = {"stats": {n: stats for n, (_, stats) in mine.items()}, "info": {n: qw.info for n, (qw, _) in mine.items()},
               "solve_s": {g: solve_s[g] for g in layer.solves}}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        self.bytes["metadata"] += len(repr(own))
        stats, info = {}, {}
        for part in gathered:
            stats.update(part["stats"])
            info.update(part["info"])
            for g, seconds in part["solve_s"].items():
                solve_s[g] = seconds
        for names in layer.groups:  # in module order, as a one-rank run installs them
            for name in names:
                module = layer.state.targets[name]
                if name in mine:
                    qw = mine[name][0]
                else:
                    qw = result_from(received[name], module.in_features, self.scheme_for(module), info[name])
                self.install(name, module, qw, stats[name])
        achieved, planned = [0.0] * self.world_size, [0.0] * self.world_size
        for task, cost, seconds, owner in zip(layer.tasks, layer.costs, solve_s, layer.owners):
            self.cost_model.observe(task, seconds)
            planned[owner] += cost
            achieved[owner] += seconds
            self._solve_s_per_rank[owner] += seconds
        groups_report = [{"modules": names, "cols": t.cols, "rows": list(t.rows), "owner": r,
                          "planned": round(c), "solve_s": round(s, 4)}
                         for names, t, c, s, r in zip(layer.groups, layer.tasks, layer.costs, solve_s, layer.owners)]
        self._record_step(index, groups_report, planned, achieved, False, time.perf_counter() - tick)

    def _record_step(self, index: int, groups: list[dict], planned: list[float], achieved: list[float],
                     planned_in_seconds: bool, wall_s: float, phases: dict[str, float] | None = None) -> None:
        """Add one solve step to the current layer's report entry. A layer solved in several steps
        (true-sequential gates) waits for each step's slowest rank, so its makespan is the sum of
        the steps' makespans. `phases`: where this rank's wall time of the step went (arrival:
        waiting for the slowest rank's forwards; reduce: for Hessian sums; solve; results:
        waiting for other owners' broadcasts and installing them; metadata; install: of row
        slices, joined after the metadata)."""
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
        if phases:
            entry["phases_s"] = {k: round(entry.get("phases_s", {}).get(k, 0.0) + v, 4) for k, v in phases.items()}
        planned_total, achieved_total = sum(entry["planned_per_rank"]), sum(entry["achieved_per_rank_s"])
        entry["planned_makespan_over_ideal"] = (entry["planned_makespan"] / (planned_total / self.world_size)
                                                if planned_total else 1.0)
        entry["achieved_makespan_over_ideal"] = (entry["achieved_makespan_s"] / (achieved_total / self.world_size)
                                                 if achieved_total else 1.0)

    @property
    def report(self) -> dict:
        out = {"world_size": self.world_size, "upper_triangle": self.upper_triangle,
               "bytes_sent": dict(self.bytes), "layers": self.layers}
        if self.solve_window:
            # Over the run, not per layer: with a window, layers are no barriers.
            planned, achieved = self._planned_loads, self._solve_s_per_rank
            out["solve_window"] = {
                "window": self.solve_window,
                "planned_per_rank": [round(p) for p in planned],
                "planned_makespan_over_ideal": max(planned) / (sum(planned) / self.world_size) if sum(planned) else 1.0,
                "solve_s_per_rank": [round(a, 3) for a in achieved],
                "achieved_makespan_over_ideal": max(achieved) / (sum(achieved) / self.world_size) if sum(achieved) else 1.0,
                # What the window did not hide: this rank's lag worker waiting for solves to publish.
                "publish_wait_s": round(self._publish_wait_s, 3),
            }
        return out




# ---------------------------------------------------------------------------------------------
# Evaluation sharded over ranks
# ---------------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------------
# Hydra multirun
# ---------------------------------------------------------------------------------------------


