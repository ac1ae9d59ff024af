"""What a recovery does, from the checked `recovery` section (`fabricq.config.RecoverySettings`
checks each field; the rules between fields are here, run by `fabricq.config.load_settings`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from fabricq.errors import FabricqError

LOSSES = ("kl", "lm", "kl+lm")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup: int = 0
    batch_size: int = 1  # windows per micro-batch on each rank
    grad_accum: int = 1
    loss: str = "kl"
    temperature: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 4
    log_every: int = 4
    logit_chunk: int = 64  # positions whose logits exist at once
    activation_checkpointing: bool = True  # keep decoder-layer inputs only; recompute the rest
    seed: int = 0

    def global_batch(self, world: int) -> int:
        return self.batch_size * self.grad_accum * world

    def identity(self, world: int) -> str:
        """What a checkpoint must agree on to be resumed (not checkpoint_every / log_every)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "log_every")}
        return hashlib.sha256(json.dumps({**fields, "world": world}, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class RecoveryPlan:
    method: str  # lora | qlora | eora (the EoRA start alone, no training)
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple | None
    init: str
    train: TrainSettings
    seq_len: int
    top_k: int
    eora_samples: int
    damp: float
    data_path: str | None
    merge: bool = False  # also write the adapter folded into the base, re-quantized on the same grid

    @property
    def base_mode(self) -> str:
        """How the base is held in memory: qlora keeps the codes packed."""
        return "qlora" if self.method == "qlora" else "lora"

    @property
    def needs_teacher(self) -> bool:
        return self.train.steps > 0 and "kl" in self.train.loss


def check_recovery(settings) -> None:
    """Rules between the fields of `settings.recovery` and the rest of the settings."""
    r = settings.recovery
    if r.method == "eora":
        if r.steps != 0:
            raise FabricqError(f"recovery=eora is the closed-form start without training: recovery.steps must be 0, "
                               f"got {r.steps} (use +recovery=lora to train from the EoRA start)")
        if r.init != "eora":
            raise FabricqError("recovery=eora needs recovery.init=eora")
    elif r.steps == 0:
        raise FabricqError(f"recovery.steps must be a positive integer with recovery={r.method}, got 0 "
                           "(+recovery=eora writes the EoRA start without training)")
    if settings.export.format == "gptq":
        raise FabricqError("recovery reads the compressed-tensors export: use export.format=compressed-tensors or both "
                           "with +recovery")
    if settings.trainer.strategy == "fsdp":
        # Lightning Fabric refuses FSDP on any accelerator but a GPU; on a GPU the adapters (tens of MiB)
        # gain nothing from sharding, and the frozen base is already read, not broadcast, by each rank.
        raise FabricqError("trainer.strategy=fsdp is not supported with recovery: Lightning Fabric runs FSDP on GPUs "
                           "only, and the adapters are trained under DDP; use trainer.strategy=ddp")
    world = settings.trainer.world_size
    if (r.init == "eora" or r.merge) and r.eora_samples < world:
        raise FabricqError(f"recovery.eora_samples={r.eora_samples} is fewer than the {world} ranks: each needs one")
    check_recovery_text(settings)


def check_recovery_text(settings) -> None:
    """recovery.data.path: a readable text file (named as the setting it is, before anything
    loads), and never the evaluation text."""
    from pathlib import Path

    from fabricq.textfiles import check_text_path

    path = settings.recovery.data.path
    if path is None or settings.recovery.steps == 0:  # eora trains on nothing: the path is not read
        return
    try:
        check_text_path(path, "recovery.data.path")
    except FabricqError as err:
        message = str(err)
        raise FabricqError(message if "recovery.data.path" in message else f"recovery.data.path: {message}") from None
    ev = settings.eval
    if ev.enabled and ev.path is not None and Path(path).expanduser().resolve() == Path(ev.path).expanduser().resolve():
        raise FabricqError(f"recovery.data.path is the evaluation text ({ev.path}): recover on other text")


def recovery_plan(settings) -> RecoveryPlan:
    """The checked `settings.recovery` as the recovery reads it."""
    r = settings.recovery
    if r is None:
        raise FabricqError("no recovery config: add +recovery=lora, +recovery=qlora or +recovery=eora")
    check_recovery(settings)
    train = TrainSettings(
        steps=r.steps, lr=float(r.lr), schedule=r.schedule, warmup=r.warmup, batch_size=r.batch_size,
        grad_accum=r.grad_accum, loss=r.loss, temperature=float(r.temperature), weight_decay=float(r.weight_decay),
        max_grad_norm=None if r.max_grad_norm is None else float(r.max_grad_norm),
        checkpoint_every=r.checkpoint_every, log_every=r.log_every, logit_chunk=r.logit_chunk,
        activation_checkpointing=r.activation_checkpointing, seed=r.seed,
    )
    return RecoveryPlan(
        method=r.method, rank=r.rank, alpha=float(r.alpha), dropout=float(r.dropout),
        target_modules=None if r.target_modules is None else tuple(r.target_modules), init=r.init, train=train,
        seq_len=r.seq_len, top_k=r.top_k, eora_samples=r.eora_samples, damp=float(r.damp), data_path=r.data.path,
        merge=r.merge,
    )
