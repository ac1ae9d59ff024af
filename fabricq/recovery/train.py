"""The recovery training loop, under Lightning Fabric.

`fabric.setup` wraps the objective (DDP across ranks, only the adapters' A and B registered with
it: every rank reads the same base from disk, so nothing else is broadcast), `fabric.backward`
runs the backward, and gradients of all but the last micro-batch of a step stay local
(`fabric.no_backward_sync`). Ranks see disjoint windows: step s uses windows
[s·G, (s+1)·G) of the recovery order (G = batch_size × grad_accum × ranks), rank r the r-th
contiguous share, so 1 rank with grad_accum = 2 and 2 ranks with grad_accum = 1 train on the
same windows and, losses being means over equal numbers of positions, on the same gradients.

Checkpoints (adapters, optimizer, schedule position, RNG, loss history) are written every
`checkpoint_every` steps and at the end; a restarted recovery continues from the newest one whose
identity (the settings, or what the caller passes: `fabricq.recovery.work`) is this run's. A
non-finite loss stops the run before the optimizer step, naming the step; the last good
checkpoint stays. After the last step the loss is measured once more (the last micro-batch,
with the final adapters): the last update can be the one that diverges, and such adapters are
neither checkpointed nor returned.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fabricq.errors import FabricqError
from fabricq.recovery.lora import LoRALinear, adapter_tensors, load_adapter_tensors
from fabricq.recovery.settings import TrainSettings
from fabricq.recovery.teacher import final_hidden, head_logits, lm_loss, topk_kl
from fabricq.sysmem import mapping_small_blocks, release_freed_memory

log = logging.getLogger("fabricq")

def local_window_order(settings: TrainSettings, world: int, rank: int) -> torch.Tensor:
    """Indices (into the recovery windows) this rank consumes, in order: per step its contiguous
    share of that step's G windows."""
    share = settings.batch_size * settings.grad_accum
    glob = settings.global_batch(world)
    return torch.cat([torch.arange(s * glob + rank * share, s * glob + (rank + 1) * share)
                      for s in range(settings.steps)]) if settings.steps else torch.zeros(0, dtype=torch.long)


def lr_factor(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to zero."""
    if step < settings.warmup:
        return (step + 1) / (settings.warmup + 1)
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    if settings.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class RecoveryObjective(nn.Module):
    """The loss of one micro-batch, inside `forward` so DDP sees the computation: the decoder
    once, then the output embedding and the loss a chunk of positions at a time, each chunk
    recomputed in the backward (`checkpoint`) so only one chunk's logits are ever alive."""

    def __init__(self, model: nn.Module, settings: TrainSettings):
        super().__init__()
        self.model = model
        self.loss_kind, self.temperature, self.chunk = settings.loss, settings.temperature, settings.logit_chunk

    def _chunk_loss(self, hidden, labels, indices, logprobs, rest):
        logits = head_logits(self.model, hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        if "kl" in self.loss_kind:
            total = total + topk_kl(logits, indices, logprobs, rest, self.temperature)
        if "lm" in self.loss_kind:
            total = total + lm_loss(logits, labels)
        return total

    def forward(self, ids, indices=None, logprobs=None, rest=None):
        hidden = final_hidden(self.model, ids)[:, :-1]
        labels = ids[:, 1:]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[1], self.chunk):
            part = slice(start, start + self.chunk)
            teacher = [t[:, part] if t is not None else None for t in (indices, logprobs, rest)]
            total = total + checkpoint(self._chunk_loss, hidden[:, part], labels[:, part], *teacher,
                                       use_reentrant=False)
        return total / labels.numel()


class CheckpointStore:
    """`step-NNNNNN.pt` files in one folder; the newest complete one wins. Each is written under a
    temporary name and renamed (a killed save leaves no torn checkpoint), with the sha256 of its
    bytes beside it (`step-NNNNNN.pt.sha256`), checked before it is resumed from."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def latest(self) -> Path | None:
        files = sorted(self.folder.glob("step-*.pt"))
        return files[-1] if files else None

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.pt"

    @staticmethod
    def digest_path(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    @staticmethod
    def digest(path: Path) -> str:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        return sha.hexdigest()

    def intact(self, path: Path) -> bool | None:
        """True: the bytes are those written; False: they changed since; None: no digest (a
        checkpoint of an earlier release, or its digest lost)."""
        try:
            want = self.digest_path(path).read_text().strip()
        except OSError:
            return None
        return self.digest(path) == want

    def prune(self, keep: Path | None) -> None:
        for old in [*self.folder.glob("step-*.pt"), *self.folder.glob("step-*.pt.sha256"), *self.folder.glob(".step-*")]:
            if keep is None or old not in (keep, self.digest_path(keep)):
                old.unlink(missing_ok=True)


def _recompute_layers(model: nn.Module, on: bool) -> None:
    """transformers' activation checkpointing (non-reentrant: DDP and frozen inputs work with it)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _identity_of(path: Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False).get("identity")
    except Exception:  # noqa: BLE001 - a torn file from a killed run: not resumable
        return None


def _ignore_frozen_state(module: nn.Module) -> None:
    """DDP broadcasts every parameter and buffer at setup and checks them; only the adapters
    need it (every rank loads the same base), the base is hundreds of MiB."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)


def _resume(fabric, store: CheckpointStore, identity: str, optimizer, scheduler, modules) -> dict:
    """Restore the newest checkpoint of these settings (adapters, optimizer, schedule, RNG, loss
    history) and return its progress; without one, or with one of other settings (removed), the
    start."""
    fresh = {"step": 0, "history": [], "window_losses": []}
    latest = store.latest()
    if latest is None:
        return fresh
    intact = store.intact(latest)
    if intact is False:
        raise FabricqError(f"the recovery checkpoint {latest} is damaged: its bytes no longer match the sha256 written "
                           "with it; pass resume=false to start the recovery over")
    if intact is None or _identity_of(latest) != identity:
        log.warning("Ignoring %s: a checkpoint of other recovery settings; starting over", latest)
        fabric.barrier()  # every rank has looked at it before it goes
        if fabric.global_rank == 0:
            store.prune(None)
        return fresh
    state = fabric.load(latest, {"optimizer": optimizer})
    load_adapter_tensors(modules, state["adapter"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info("Recovery resumes after step %d (%s)", state["step"], latest.name)
    return {"step": int(state["step"]), "history": list(state["history"]),
            "window_losses": list(state["window_losses"])}  # losses since the curve's last point


def _save(fabric, store: CheckpointStore, step: int, state: dict) -> None:
    """Rank 0 writes (Fabric's save), then only the newest checkpoint is kept."""
    path = store.path_for(step)
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.global_rank == 0:
        store.folder.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.global_rank == 0:
        digest = store.digest_path(path)
        digest.with_name(f".{digest.name}.tmp").write_text(store.digest(tmp) + "\n")
        os.replace(digest.with_name(f".{digest.name}.tmp"), digest)
        os.replace(tmp, path)
        store.prune(path)
    fabric.barrier()  # the checkpoint is in place before any rank goes on


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    loss_curve: list = field(default_factory=list)
    resumed_from_step: int | None = None
    tokens_per_s: float = 0.0


def _advice(settings: TrainSettings, alpha: float | None) -> str:
    return (f"try a smaller recovery.lr (now {settings.lr:g})"
            + (f" or recovery.alpha (now {alpha:g})" if alpha is not None else ""))


def _final_loss(fabric, objective, windows, teacher, settings: TrainSettings, autocast) -> float:
    """The loss of the last step's last micro-batch with the adapters as trained (every rank its
    own, averaged: all ranks reach the same verdict)."""
    first = (settings.steps * settings.grad_accum - 1) * settings.batch_size
    rows = slice(first, first + settings.batch_size)
    ids = windows[rows].to(fabric.device)
    teach = [t.to(fabric.device) for t in teacher.rows(rows)] if teacher is not None else []
    rng = torch.get_rng_state()  # (dropout draws): the check leaves the random stream as training left it
    with torch.no_grad(), autocast:
        loss = objective(ids, *teach).detach().double().cpu()
    torch.set_rng_state(rng)
    if fabric.world_size > 1:
        loss = fabric.all_reduce(loss.to(fabric.device), reduce_op="mean").cpu()
    return float(loss)


def train(fabric, model: nn.Module, modules: dict[str, LoRALinear], windows: torch.Tensor, teacher, *,
          settings: TrainSettings, store: CheckpointStore, show_progress: bool = True, identity: str | None = None,
          alpha: float | None = None) -> TrainResult:
    """Train the adapters of `modules` (inside `model`) for `settings.steps` steps.

    windows: this rank's windows in consumption order (`local_window_order`), (n, seq_len).
    teacher: TeacherTargets for exactly those windows, or None for loss=lm.
    identity: what a checkpoint must carry to be resumed (default: the training settings and the
    rank count). alpha: the adapters' alpha, named in the advice when training diverges."""
    world, rank = fabric.world_size, fabric.global_rank
    if settings.activation_checkpointing:
        _recompute_layers(model, True)
    objective = RecoveryObjective(model, settings)
    if world > 1:
        _ignore_frozen_state(objective)
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    objective, optimizer = fabric.setup(objective, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(settings, s))
    identity = identity or settings.identity(world)

    progress = _resume(fabric, store, identity, optimizer, scheduler, modules)
    start, history, window_losses = progress["step"], progress["history"], progress["window_losses"]
    resumed = start or None

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if fabric.device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
    micro, accum = settings.batch_size, settings.grad_accum
    tokens_per_step = settings.global_batch(world) * (windows.shape[1] - 1)
    bar = tqdm(total=settings.steps, initial=start, desc="Recovery", unit="step",
               disable=not show_progress or rank != 0, mininterval=2)
    tick = time.perf_counter()
    # The step's activation-sized temporaries (below the heap's 2 MiB mapping threshold) would
    # otherwise grow the heap, each layer making more of it resident: on the default model the
    # step's peak RSS stood ~0.4 GiB above its start, with the memory alive nearly unchanged.
    # Mapped afresh, they cost page faults instead (benchmarks/results/2026-11-28-recovery-training-memory.md).
    try:
        with mapping_small_blocks():
            for step in range(start, settings.steps):
                step_loss = torch.zeros((), dtype=torch.float64)
                for m in range(accum):
                    first = (step * accum + m) * micro
                    rows = slice(first, first + micro)
                    ids = windows[rows].to(fabric.device)
                    teach = [t.to(fabric.device) for t in teacher.rows(rows)] if teacher is not None else []
                    with fabric.no_backward_sync(objective, enabled=m < accum - 1):
                        with autocast:
                            loss = objective(ids, *teach) / accum
                        fabric.backward(loss)
                    step_loss += float(loss.detach())
                if world > 1:
                    step_loss = fabric.all_reduce(step_loss.to(fabric.device), reduce_op="mean").cpu()
                value = float(step_loss)
                if not math.isfinite(value):
                    kept = store.latest()
                    where = f"step {int(kept.stem.split('-')[1])}: {kept}" if kept else "none was written yet"
                    raise FabricqError(f"recovery diverged: the loss is {value} at step {step + 1}; the last good adapter "
                                       f"checkpoint is kept ({where}); nothing was published: {_advice(settings, alpha)}")
                if settings.max_grad_norm:
                    fabric.clip_gradients(objective, optimizer, max_norm=settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                # The adapters' gradients, moments and a checkpoint's copies are blocks below the heap's
                # mapping threshold: freed, they stay resident unless trimmed, and RSS grows with steps.
                release_freed_memory()
                window_losses.append(value)
                done = step + 1
                if done % settings.log_every == 0 or done == settings.steps:
                    history.append({"step": done, "loss": sum(window_losses) / len(window_losses)})
                    window_losses = []
                elapsed = time.perf_counter() - tick
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{(done - start) * tokens_per_step / max(elapsed, 1e-9):.0f}")
                bar.update(1)
                if done == settings.steps:  # checked first: below
                    break
                if done % settings.checkpoint_every == 0:
                    _save(fabric, store, done, {
                        "adapter": adapter_tensors(modules), "optimizer": optimizer, "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(), "step": done, "history": history, "identity": identity,
                        "window_losses": window_losses})
            final = _final_loss(fabric, objective, windows, teacher, settings, autocast)
            if not math.isfinite(final):
                kept = store.latest()
                where = f"step {int(kept.stem.split('-')[1])}: {kept}" if kept else "none was written yet"
                raise FabricqError(f"recovery diverged: after the last step ({settings.steps}) the loss is {final}; the "
                                   f"last good adapter checkpoint is kept ({where}); nothing was published: "
                                   f"{_advice(settings, alpha)}")
            if start < settings.steps:
                _save(fabric, store, settings.steps, {
                    "adapter": adapter_tensors(modules), "optimizer": optimizer, "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "step": settings.steps, "history": history, "identity": identity,
                    "window_losses": window_losses})
    finally:  # the bar's last refresh must not follow an error line
        bar.close()
    if settings.activation_checkpointing:
        _recompute_layers(model, False)
    wall = time.perf_counter() - tick
    trained = settings.steps - start
    return TrainResult(steps=settings.steps, tokens=settings.steps * tokens_per_step, wall_s=wall,
                       loss_curve=history, resumed_from_step=resumed,
                       tokens_per_s=trained * tokens_per_step / wall if wall > 0 else 0.0)
