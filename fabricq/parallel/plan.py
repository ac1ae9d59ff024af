"""Pure planning of multi-rank work: data shards, the solve cost model, assignment of groups to ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def shard_batches(num_batches: int, world_size: int) -> list[range]:
    """Contiguous, disjoint ranges of batch indices, one per rank, sizes differing by at most one
    (the first ranks take the extra batches). Together they cover every batch exactly once."""
    base, extra = divmod(num_batches, world_size)
    shards, start = [], 0
    for rank in range(world_size):
        size = base + (rank < extra)
        shards.append(range(start, start + size))
        start += size
    return shards


def local_samples(samples: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's calibration windows: whole batches of the one-rank run. Because the shards are
    contiguous and only the globally last batch can be short, `local.split(batch_size)` yields
    exactly the same micro-batches the one-rank run forwards for these indices."""
    shard = shard_batches(math.ceil(len(samples) / batch_size), world_size)[rank]
    return samples[shard.start * batch_size : shard.stop * batch_size]


@dataclass(frozen=True)
class SolveTask:
    """One shared-input group: the modules reading one input share its Hessian (cols × cols),
    which is factorised once; each module then solves its rows."""

    cols: int
    rows: tuple[int, ...]

    @property
    def signature(self) -> tuple:
        return (self.cols, self.rows)


def solve_cost(task: SolveTask) -> float:
    """Analytic GPTQ cost: cols³ (factorising the group's Hessian, once) + rows·cols² per module."""
    return float(task.cols) ** 3 + sum(float(r) * task.cols**2 for r in task.rows)


@dataclass
class CostModel:
    """Predicted seconds (or analytic units until anything was measured) per task.

    Layers of a transformer repeat the same shapes, so a measured time for a signature (mean of
    its observations) predicts the next layer exactly up to noise; shapes never measured are
    scaled from the analytic cost by the median measured/analytic ratio."""

    observed: dict[tuple, list[float]] = field(default_factory=dict)

    def observe(self, task: SolveTask, seconds: float) -> None:
        self.observed.setdefault(task.signature, []).append(seconds)

    def _ratio(self) -> float | None:
        ratios = sorted(
            (sum(t) / len(t)) / solve_cost(SolveTask(*sig)) for sig, t in self.observed.items()
        )
        return ratios[len(ratios) // 2] if ratios else None

    @property
    def in_seconds(self) -> bool:
        return bool(self.observed)

    def predict(self, task: SolveTask) -> float:
        if not self.in_seconds:
            return solve_cost(task)
        times = self.observed.get(task.signature)
        if times:
            return sum(times) / len(times)
        return solve_cost(task) * self._ratio()


def assign_to_ranks(costs: list[float], world_size: int, exact_limit: int = 12) -> list[int]:
    """Owner rank of each task, minimising the largest per-rank total (the makespan).

    Exact branch and bound (largest first, empty ranks interchangeable) for up to `exact_limit`
    tasks — a decoder layer has 4–7 — and longest-processing-time-first beyond. Deterministic:
    every rank computes the same plan from the same costs."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    # Longest-processing-time first: a good start and the answer for many tasks.
    loads = [0.0] * world_size
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += costs[i]
    if len(costs) > exact_limit or world_size == 1:
        return owner
    best = [max(loads), owner[:]]
    bound = max(max(costs, default=0.0), sum(costs) / world_size)
    loads = [0.0] * world_size
    current = [0] * len(costs)

    def search(k: int) -> bool:
        if k == len(order):
            makespan = max(loads)
            if makespan < best[0]:
                best[0], best[1] = makespan, current[:]
            return best[0] <= bound * (1 + 1e-12)
        i = order[k]
        tried_empty = False
        for r in range(world_size):
            if loads[r] == 0.0:
                if tried_empty:
                    continue
                tried_empty = True
            if loads[r] + costs[i] >= best[0]:
                continue
            loads[r] += costs[i]
            current[i] = r
            done = search(k + 1)
            loads[r] -= costs[i]
            if done:
                return True
        return False

    search(0)
    return best[1]


# Row slices of a module start at multiples of this many rows: a matrix product then takes, for
# every row, the same kernel path (and float summation order) as on the whole matrix, so the
# slices' GPTQ results are bit-identical to one solve (checked on this CPU by the tests).
ROW_ALIGN = 64


def split_rows(rows: int, parts: int, align: int = ROW_ALIGN) -> list[range]:
    """`parts` contiguous row ranges covering `rows`, as even as `align`-row units allow (trailing
    ranges may be empty when there are fewer units than parts)."""
    units = math.ceil(rows / align)
    bounds = [min(rows, (units * i // parts) * align) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def split_stacked_rows(rows: list[int], parts: int, align: int = ROW_ALIGN) -> list[list[range]]:
    """`split_rows` of modules whose rows are stacked (a shared-input group, solved as one
    matrix): per module, each part's range of that module's own rows (maybe empty), so that the
    parts are even over the whole stack, not module by module (q/k/v with 576/192/192 rows on 2
    parts: 448 and 512 rows, where per module it would be 256+64+64 and 320+128+128)."""
    out, first = [], 0
    stack = split_rows(sum(rows), parts, align)
    for n in rows:
        end = first + n
        out.append([range(min(max(r.start, first), end) - first, min(max(r.stop, first), end) - first) for r in stack])
        first = end
    return out


def makespan(costs: list[float], owners: list[int], world_size: int) -> float:
    loads = [0.0] * world_size
    for c, r in zip(costs, owners):
        loads[r] += c
    return max(loads)
