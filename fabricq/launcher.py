"""Which launcher started this process and what this machine can run: can a requested launch
(devices, nodes, torchrun/SLURM world size) happen here? Checked with the config, before any
process starts, so it knows nothing of Fabric and imports torch only to count accelerators."""

from __future__ import annotations

import os

from fabricq.errors import FabricqError

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


def check_launch(trainer, distributed, environ=os.environ) -> None:
    """Every check of the `trainer` and `distributed` settings that can fail before processes start."""
    devices = trainer.devices
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
    elif trainer.accelerator in ("auto", "cpu") and devices > usable_cpus() and not distributed.cpu_oversubscribe:
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
