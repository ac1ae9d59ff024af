"""Fabric construction and launch, trainer checks, rank agreement and labels, multirun jobs."""

from __future__ import annotations

import hashlib
import math
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq.errors import FabricqError

log = logging.getLogger("fabricq")


STRATEGIES = ("auto", "ddp", "fsdp")


# Environment variables by which an external launcher (torchrun / SLURM) announces the ranks.
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")


_SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID")


_MANUAL_MULTINODE_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


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
