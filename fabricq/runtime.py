"""Fabric construction and launch, rank agreement and labels, multirun jobs. Whether a launch can
happen on this machine is `fabricq.launcher`'s question, asked before anything starts."""

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
from fabricq.launcher import external_launcher

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
