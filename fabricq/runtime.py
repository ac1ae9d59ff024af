"""Fabric construction and launch, rank agreement and labels, multirun jobs, and the checks of
whether a launch can happen on this machine (`check_launch`, run by `fabricq.config.load_settings`)."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq.config import Settings
from fabricq.errors import FabricqError

log = logging.getLogger("fabricq")


def make_strategy(settings: Settings):
    """The Fabric strategy named by trainer.strategy, with the collective timeout of
    distributed.timeout_s (a failed rank then stops the others within that bound instead of
    hanging)."""
    trainer = settings.trainer
    if trainer.world_size == 1 and trainer.strategy == "auto":
        return "auto"
    from lightning_fabric.strategies import DDPStrategy, FSDPStrategy

    timeout = timedelta(seconds=float(settings.distributed.timeout_s))
    if trainer.strategy == "fsdp":
        return FSDPStrategy(timeout=timeout)
    return DDPStrategy(timeout=timeout)


def config_digest(config: Settings | DictConfig | dict) -> str:
    """Hash of the resolved config, without the fields that legitimately differ between ranks
    (the output directory each rank's Hydra resolved from the clock)."""
    if isinstance(config, Settings):
        config = config.as_dict()
    data = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    data.pop("output_dir", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(data)).encode()).hexdigest()


def launch(settings: Settings, output_dir: Path):
    """Create and launch Fabric. Children re-run the command line: they get the resolved output
    directory appended, so all ranks agree on it. Then the ranks compare config digests.

    Returns (fabric, output_dir as rank 0 sees it)."""
    from lightning_fabric import Fabric

    trainer = settings.trainer
    if trainer.world_size > 1 and external_launcher() is None and "LOCAL_RANK" not in os.environ:
        sys.argv = [*sys.argv, f"output_dir={output_dir.resolve()}"]
    fabric = Fabric(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=make_strategy(settings),
    )
    fabric.launch()
    if fabric.world_size == 1:
        return fabric, output_dir
    if fabric.global_rank != 0:  # one copy of the progress log, from rank 0
        log.setLevel(logging.WARNING)
    digests = [None] * fabric.world_size
    torch.distributed.all_gather_object(digests, config_digest(settings))
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


def run_multirun_job_in_subprocess(settings: Settings, hydra_dir: Path, output_dir: Path) -> bool:
    """Under `-m` with several ranks, run this job as a fresh single-run process tree.

    Fabric's launcher re-executes the command line for ranks 1..N-1; under multirun that is the
    whole sweep, so every child would run every job. Instead, the sweep process starts
    `python -m fabricq <this job's overrides> output_dir=<job dir>` (no `-m`), in which Fabric
    launches the ranks of this job only; the sweep's own process never joins a process group,
    so the next job starts clean. Returns False when nothing was done (not such a job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or settings.trainer.world_size == 1 or external_launcher():
        return False
    import subprocess

    command = [
        sys.executable, "-m", "fabricq", *hydra.overrides.task,
        f"output_dir={output_dir.resolve()}", f"hydra.run.dir={hydra_dir.resolve()}", "hydra.output_subdir=null",
    ]
    log.info("Multirun job %s: %d ranks in a fresh process tree", hydra.job.num, settings.trainer.world_size)
    completed = subprocess.run(command, cwd=hydra.runtime.cwd)
    if completed.returncode != 0:
        sys.exit(completed.returncode)
    return True

# Can this launch happen here? (devices of this machine, the launcher's environment)

# Environment variables by which an external launcher (torchrun / SLURM) announces the ranks.
_TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")
_SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID")
_MANUAL_MULTINODE_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


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


def uses_cuda(accelerator: str) -> bool:
    import torch

    return accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())


def devices_here() -> str:
    """What this machine can run on, for messages about an accelerator it lacks."""
    import torch

    have = [f"{usable_cpus()} usable CPU core(s)", f"{torch.cuda.device_count()} CUDA device(s)",
            "MPS" if torch.backends.mps.is_available() else "no MPS"]
    return "it has " + ", ".join(have)


def check_launch(s: Settings, environ=os.environ) -> None:
    """Every check on trainer/distributed that can fail before processes start."""
    trainer, devices = s.trainer, s.trainer.devices
    # One device on whatever is there cannot fail: no torch import just to learn whether CUDA is.
    cuda = not (trainer.accelerator == "auto" and devices == 1 and trainer.strategy != "fsdp") and uses_cuda(
        trainer.accelerator)
    if trainer.strategy == "fsdp" and not cuda:
        raise FabricqError("trainer.strategy=fsdp needs CUDA devices (Fabric's FSDP is GPU-only): use ddp on CPU")
    if trainer.accelerator == "mps" and "no MPS" in devices_here():
        raise FabricqError(f"trainer.accelerator=mps but this machine has no MPS device ({devices_here()}): "
                           "use trainer.accelerator=auto or cpu")
    if cuda:
        import torch

        if torch.cuda.device_count() == 0:
            raise FabricqError(f"trainer.accelerator={trainer.accelerator} but this machine has no CUDA device "
                               f"({devices_here()}): use trainer.accelerator=auto or cpu")
        if devices > torch.cuda.device_count():
            raise FabricqError(f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif trainer.accelerator in ("auto", "cpu") and devices > usable_cpus() and not s.distributed.cpu_oversubscribe:
        raise FabricqError(
            f"trainer.devices={devices} CPU ranks but only {usable_cpus()} usable CPU core(s): one rank per core "
            "(pass distributed.cpu_oversubscribe=true to run more ranks than cores anyway)"
        )
    world, launcher = trainer.world_size, external_launcher(environ)
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
