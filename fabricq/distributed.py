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

import hashlib
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq.callbacks import GPTQCallback, GPTQSettings, LayerState
from fabricq.errors import FabricqError
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.packing import packed_width

log = logging.getLogger("fabricq")

STRATEGIES = ("auto", "ddp", "fsdp")
# Environment variables by which an external launcher (torchrun / SLURM) announces the ranks.
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")
_SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID")
_MANUAL_MULTINODE_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


# ---------------------------------------------------------------------------------------------
# Configuration checks (before any process is launched)
# ---------------------------------------------------------------------------------------------


def world_size_of(trainer: DictConfig) -> int:
    return int(trainer.devices) * int(trainer.num_nodes)


def external_launcher(environ=os.environ) -> str | None:
    """'torchrun' or 'slurm' when such a launcher started this process, else None."""
    if any(v in environ for v in _TORCHRUN_VARS):
        return "torchrun"
    if all(v in environ for v in _SLURM_VARS) and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    return None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())


def validate_trainer(trainer: DictConfig, data: DictConfig, environ=os.environ) -> None:
    """Every check on trainer.* that can fail before processes start, one clear line each."""
    for name in ("devices", "num_nodes"):
        value = trainer[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FabricqError(f"trainer.{name} must be a positive integer, got {value!r}")
    if trainer.strategy not in STRATEGIES:
        raise FabricqError(f"trainer.strategy must be one of {STRATEGIES}, got {trainer.strategy!r}")
    timeout = trainer.get("timeout_s", 600)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise FabricqError(f"trainer.timeout_s must be a positive number of seconds, got {timeout!r}")
    if trainer.get("balance", "measured") not in ("measured", "analytic"):
        raise FabricqError(f"trainer.balance must be measured or analytic, got {trainer.balance!r}")

    window = trainer.get("solve_window", "auto")
    if window != "auto" and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
        raise FabricqError(f"trainer.solve_window must be auto or a whole number of layers ≥ 0, got {window!r}")

    devices = trainer.devices
    if trainer.strategy == "fsdp" and not _uses_cuda(trainer.accelerator):
        raise FabricqError("trainer.strategy=fsdp needs CUDA devices (Fabric's FSDP is GPU-only): use ddp on CPU")
    if _uses_cuda(trainer.accelerator):
        available = torch.cuda.device_count()
        if devices > available:
            raise FabricqError(f"trainer.devices={devices} but this machine has {available} CUDA device(s)")
    elif trainer.accelerator in ("auto", "cpu"):
        cpus = usable_cpus()
        if devices > cpus and not trainer.get("cpu_oversubscribe", False):
            raise FabricqError(
                f"trainer.devices={devices} CPU ranks but only {cpus} usable CPU core(s): one rank per core "
                "(pass trainer.cpu_oversubscribe=true to run more ranks than cores anyway)"
            )

    world = devices * trainer.num_nodes
    launcher = external_launcher(environ)
    if launcher == "torchrun" and "WORLD_SIZE" in environ and int(environ["WORLD_SIZE"]) != world:
        raise FabricqError(
            f"torchrun started {environ['WORLD_SIZE']} processes but trainer.devices × trainer.num_nodes = {world}"
        )
    if launcher == "slurm" and int(environ["SLURM_NTASKS"]) != world:
        raise FabricqError(
            f"SLURM started {environ['SLURM_NTASKS']} tasks but trainer.devices × trainer.num_nodes = {world}"
        )
    if trainer.num_nodes > 1 and launcher is None:
        missing = [v for v in _MANUAL_MULTINODE_VARS if v not in environ]
        if missing:
            raise FabricqError(
                f"trainer.num_nodes={trainer.num_nodes} needs a multi-node launch: start it with torchrun or "
                f"srun, or set {', '.join(missing)} on every node (see README, Distributed runs)"
            )
    batches = math.ceil(data.num_samples / data.batch_size)
    if world > batches:
        raise FabricqError(
            f"{world} ranks but only {batches} calibration batches (data.num_samples={data.num_samples}, "
            f"data.batch_size={data.batch_size}): every rank needs at least one batch"
        )


def solve_window_of(trainer: DictConfig, lag: int) -> int:
    """Layers a layer's distributed solves may trail its calibration. Only a lagged pipeline
    allows any (without a lag, the next layer is calibrated on this one's quantized outputs);
    auto: the number of ranks, enough for the simulated Llama-3 runs to be balanced to a few
    percent (benchmarks/assignment_sim.py)."""
    window = trainer.get("solve_window", "auto")
    if window == "auto":
        return world_size_of(trainer) if lag else 0
    if window and not lag:
        raise FabricqError(
            f"trainer.solve_window={window} needs pipeline.lag=1 (without a lag every layer is calibrated on "
            "the previous layer's quantized outputs, so its solves cannot trail): add pipeline.lag=1 "
            "or set trainer.solve_window=0"
        )
    return window


def make_strategy(trainer: DictConfig):
    """The Fabric strategy named by trainer.strategy, with the collective timeout of the config
    (a failed rank then stops the others within that bound instead of hanging)."""
    if world_size_of(trainer) == 1 and trainer.strategy == "auto":
        return "auto"
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy

    timeout = timedelta(seconds=float(trainer.get("timeout_s", 600)))
    if trainer.strategy == "fsdp":
        return FSDPStrategy(timeout=timeout)
    return DDPStrategy(timeout=timeout)


def config_digest(cfg: DictConfig) -> str:
    """Hash of the resolved config, without the fields that legitimately differ between ranks
    (the output directory each rank's Hydra resolved from the clock)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("output_dir", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()


def launch(cfg: DictConfig, output_dir: Path):
    """Create and launch Fabric. Children re-run the command line: they get the resolved output
    directory appended, so all ranks agree on it. Then the ranks compare config digests.

    Returns (fabric, output_dir as rank 0 sees it)."""
    from lightning.fabric import Fabric

    if world_size_of(cfg.trainer) > 1 and external_launcher() is None and "LOCAL_RANK" not in os.environ:
        sys.argv = [*sys.argv, f"output_dir={output_dir.resolve()}"]
    fabric = Fabric(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=make_strategy(cfg.trainer),
    )
    fabric.launch()
    if fabric.world_size == 1:
        return fabric, output_dir
    if fabric.global_rank != 0:  # one copy of the progress log, from rank 0
        log.setLevel(logging.WARNING)
    digests = [None] * fabric.world_size
    torch.distributed.all_gather_object(digests, config_digest(cfg))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        # Every rank knows now; a rank that raised at once could exit while a peer still reads
        # its part of the gather, and that peer would report a closed connection instead.
        try:
            torch.distributed.barrier()
        except Exception:  # a peer already left after the barrier: the mismatch is the error
            pass
        raise FabricqError(
            f"rank {fabric.global_rank}: the resolved config differs between ranks (rank(s) "
            f"{', '.join(map(str, differ))} vs rank 0): launch every rank with the same overrides"
        )
    shared = [str(output_dir)]
    torch.distributed.broadcast_object_list(shared, src=0)
    return fabric, Path(shared[0])


def finish(fabric) -> None:
    """Every rank waits for rank 0's files, then the process group is torn down."""
    if fabric.world_size > 1 and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()


def rank_label() -> str:
    """'rank R/W: ' in a multi-rank run, so every error names the rank that raised it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return f"rank {rank}/{world}: " if world > 1 else ""


# ---------------------------------------------------------------------------------------------
# Sharding the calibration data
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Cost model and assignment (pure)
# ---------------------------------------------------------------------------------------------


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

    use_measurements: bool = True
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
        return self.use_measurements and bool(self.observed)

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


def assign_with_backlog(costs: list[float], loads: list[float]) -> list[int]:
    """Owner rank of each task of one layer when solves may trail calibration (a solve window):
    largest task first, each to the rank with the least work planned so far, `loads` (updated in
    place) carrying every rank's planned total over the layers before. A rank that drew a
    down_proj (most of a layer's cost) is thereby passed over for the next layers until the
    others have caught up, so the run, not each layer, is balanced. Deterministic: every rank
    computes the same plan from the same costs."""
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(len(loads)), key=lambda k: (loads[k], k))
        owners[i] = r
        loads[r] += costs[i]
    return owners


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


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------


def _triu_indices(n: int, device) -> torch.Tensor:
    return torch.triu_indices(n, n, device=device)


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (with diagonal) of a square matrix as a flat vector."""
    i, j = _triu_indices(matrix.shape[0], matrix.device)
    return matrix[i, j]


def unpack_upper(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Symmetric matrix from `pack_upper`'s vector (the lower triangle mirrors the upper)."""
    i, j = _triu_indices(n, flat.device)
    out = torch.empty(n, n, dtype=flat.dtype, device=flat.device)
    out[i, j] = flat
    out[j, i] = flat
    return out


def _reduction_payload(acc, upper_triangle: bool) -> torch.Tensor:
    """What a rank sends of a Hessian accumulator: its raw sum (reduced in place), or with
    `upper_triangle` only one triangle of it. The raw sum is exact on and below the diagonal, so
    the triangle sent is the lower one, read as the upper triangle of the transpose."""
    return pack_upper(acc.raw.T) if upper_triangle else acc.raw


def _groups_of(scheme, in_features: int) -> int:
    return 1 if scheme.group_size == -1 else math.ceil(in_features / scheme.group_size)


def _result_buffers(rows: int, cols: int, groups: int, device, packed_bits: int | None = None) -> dict[str, torch.Tensor]:
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


def _held_result_parts(qw) -> dict[str, torch.Tensor]:
    """What travels of a result as `GPTQCallback.install` holds it (codes packed below 8 bits:
    half the bytes, and no unpacking)."""
    codes = {"packed_codes": qw.packed_codes} if isinstance(qw, PackedQuantizedWeight) else {"codes": qw.codes}
    return {**codes, "scale": qw.scale, "zero": qw.zero, "g_idx": qw.g_idx}


def _result_from(parts: dict[str, torch.Tensor], cols: int, scheme, info: dict):
    cpu = {k: v.cpu() for k, v in parts.items()}
    if "packed_codes" in cpu:
        return PackedQuantizedWeight(cpu["packed_codes"], cols, cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)
    return QuantizedWeight(cpu["codes"], cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)


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
            bufs = {k: v.to(self.device) for k, v in _held_result_parts(qw).items()}
        else:
            bufs = _result_buffers(rows, cols, n_groups, self.device, packed_bits)
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
            payload = _reduction_payload(acc, self.upper_triangle)
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
                    _groups_of(scheme, module.in_features), works,
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
            self.install(name, module, _result_from(bufs, module.in_features, scheme, {}), {})
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
            payload = _reduction_payload(acc, self.upper_triangle)
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
            n_groups = _groups_of(self.scheme_for(module), module.in_features)
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
            payload = _reduction_payload(acc, self.upper_triangle)
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
                    _groups_of(self.scheme_for(module), module.in_features), broadcasts)
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
                    qw = _result_from(received[name], module.in_features, self.scheme_for(module), info[name])
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


def gather_totals(fabric, callback: DistributedGPTQCallback) -> dict:
    """Bytes sent, summed over ranks (reduce payloads to other owners, broadcasts a rank sourced,
    metadata), and each rank's CPU seconds so far (how evenly the work was shared)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    mine = {"bytes": callback.bytes, "cpu_s": usage.ru_utime + usage.ru_stime}
    parts = [None] * fabric.world_size
    torch.distributed.all_gather_object(parts, mine)
    return {
        "bytes_sent": {k: sum(p["bytes"][k] for p in parts) for k in parts[0]["bytes"]},
        "cpu_s_per_rank": [round(p["cpu_s"], 2) for p in parts],
    }


# ---------------------------------------------------------------------------------------------
# Evaluation sharded over ranks
# ---------------------------------------------------------------------------------------------


def evaluate_sharded(fabric, model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None,
                     desc: str | None = None) -> dict:
    """`fabricq.evaluate.evaluate` with the windows split over ranks (contiguous shards) and the
    sums combined: the same perplexity and KL as one rank up to float rounding. The log-probs
    kept for the KL stay on the rank that computed them (`reference` is that rank's list).
    Only rank 0 shows the progress bar (`desc`)."""
    from fabricq.evaluate import evaluate

    progress = {"desc": desc} if desc else {}
    if fabric.world_size == 1:
        return evaluate(model, windows, device, keep=keep, reference=reference, **progress)
    shard = shard_batches(len(windows), fabric.world_size)[fabric.global_rank]
    local = windows[shard.start : shard.stop]
    local_keep = max(0, min(keep, shard.stop) - shard.start)
    totals = torch.zeros(4, dtype=torch.float64)
    kept: list = []
    if len(local):
        result = evaluate(model, local, device, keep=local_keep, reference=reference or None,
                          **(progress if fabric.global_rank == 0 else {}))
        kept = result["logprobs"]
        totals[0] = math.log(result["ppl"]) * result["tokens"]
        totals[1] = result["tokens"]
        if reference:
            kl_tokens = sum(len(w) - 1 for w in local[: len(reference)])
            totals[2] = result["kl"] * kl_tokens
            totals[3] = kl_tokens
    totals = totals.to(fabric.device)
    torch.distributed.all_reduce(totals)
    totals = totals.cpu()
    out = {"ppl": math.exp(totals[0] / totals[1]), "tokens": int(totals[1]), "logprobs": kept}
    if reference is not None:
        out["kl"] = float(totals[2] / totals[3])
    return out


# ---------------------------------------------------------------------------------------------
# Hydra multirun
# ---------------------------------------------------------------------------------------------


def run_multirun_job_in_subprocess(cfg: DictConfig, hydra_dir: Path, output_dir: Path) -> bool:
    """Under `-m` with several ranks, run this job as a fresh single-run process tree.

    Fabric's launcher re-executes the command line for ranks 1..N-1; under multirun that is the
    whole sweep, so every child would run every job. Instead, the sweep process starts
    `python -m fabricq <this job's overrides> output_dir=<job dir>` (no `-m`), in which Fabric
    launches the ranks of this job only; the sweep's own process never joins a process group,
    so the next job starts clean. Returns False when nothing was done (not such a job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or world_size_of(cfg.trainer) == 1 or external_launcher():
        return False
    import subprocess

    command = [
        sys.executable, "-m", "fabricq", *hydra.overrides.task,
        f"output_dir={output_dir.resolve()}", f"hydra.run.dir={hydra_dir.resolve()}", "hydra.output_subdir=null",
    ]
    log.info("Multirun job %s: %d ranks in a fresh process tree", hydra.job.num, world_size_of(cfg.trainer))
    completed = subprocess.run(command, cwd=hydra.runtime.cwd)
    if completed.returncode != 0:
        sys.exit(completed.returncode)
    return True
