"""One recovery of a finished fabricq output: text → teacher → quantized base with adapters →
EoRA start → training → PEFT adapter → (merge=true: the merged model, `recovery.merge`) →
evaluation through the serving path → report.

The original model is loaded once: it is the teacher (top-k targets of the recovery windows and,
for the windows the run's evaluation cache lacks, the evaluation reference) and its skeleton then
becomes the student, its target modules replaced
by adapters over the exported codes and its other tensors overwritten with the exported ones.
Intermediate state (teacher targets, checkpoints) lives in `.<RUN_DIR name>.recovery/` beside the
output and is removed when the recovery has finished. The report gives each phase's peak RSS
(`peak_rss_by_phase_mib`): the phases run one after the other, and what a phase no longer needs
(the original weights, the checkpoint's tensors, the student before evaluation) is released.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from fabricq import runtime
from fabricq.config import load_settings
from fabricq.data import prepare_text
from fabricq.errors import FabricqError
from fabricq.eval_cache import reference_cache
from fabricq.evaluate import (
    evaluate_sharded,
    reference_from_tensors,
    reference_tensors,
)
from fabricq.models import (
    check_finite_weights,
    check_model_files,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from fabricq.recovery import eora
from fabricq.recovery import teacher as teacher_mod
from fabricq.output import launch_rank
from fabricq.recovery.evaluation import (
    for_evaluation,
    gap_closed,
    original_reference,
    rank_reducer,
    run_base_result,
)
from fabricq.recovery.text import recovery_text
from fabricq.recovery.adapter import ADAPTER_DIR, load_with_adapter, save_peft_adapter
from fabricq.recovery.base import check_run_dir, load_exported_tensors, read_run
from fabricq.recovery.lora import attach_lora, check_rank, select_targets
from fabricq.recovery.merge import (
    MERGED_DIR,
    merge_adapters,
    restore_linear,
    write_merged,
)
from fabricq.recovery.publish import RecoveryClaim
from fabricq.recovery.settings import RecoveryPlan, recovery_plan
from fabricq.recovery.train import CheckpointStore, local_window_order, train
from fabricq.recovery.work import (
    check_work,
    prepare_work,
    recovery_identity,
    recovery_work_dir,
)
from fabricq.resume import identity_hash, model_identity
from fabricq.sysmem import (
    drop_mapped_pages,
    peak_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    return_large_blocks_to_os,
)

log = logging.getLogger("fabricq")


class PhasePeaks:
    """Peak RSS per phase of the recovery (MiB): `end(name)` closes the phase running since the
    previous call, and the next one starts from the memory alive then."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        reset_peak_rss()

    def end(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_mib())
        log.debug("Recovery phase %s: peak RSS %.0f MiB", name, self.peaks[name])
        reset_peak_rss()


def build_student(model, run, targets: list[str], s: RecoveryPlan) -> dict:
    """Turn the original `model` into the exported base with adapters over `targets`: the
    checkpoint's unquantized tensors as exported, each target an adapter over its codes, and
    each quantized module left without an adapter computing with its dequantized codes."""
    load_exported_tensors(model, run)
    for name in sorted(set(run.quantized) - set(targets)):
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(run.quantized[name].dequantize().to(module.weight.dtype), requires_grad=False)
    return attach_lora(model, run.quantized, targets, rank=s.rank, alpha=s.alpha, dropout=s.dropout,
                       mode=s.base_mode, seed=s.train.seed)


def _check_belongs(modules: dict, run, model_name: str) -> None:
    """Every quantized module of the run exists in the model with its shape. (A function of its
    own: a loop variable left in `recover` would keep one of the checkpoint's tensors, and with it
    the whole memory-mapped checkpoint, resident until the end.)"""
    for name, qw in run.quantized.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(qw.shape):
            raise FabricqError(f"RUN_DIR {run.folder} does not belong to {model_name}: it quantizes {name} "
                               f"{tuple(qw.shape)}, which the model lacks or shapes differently")


def _diverged(what: str, s: RecoveryPlan) -> FabricqError:
    return FabricqError(f"recovery diverged: {what}; nothing was published (an earlier adapter is left as it was): "
                        f"try a smaller recovery.lr (now {s.train.lr:g}) or recovery.alpha (now {s.alpha:g})")


@torch.no_grad()
def check_finite_adapter(model, lora: dict, ids: torch.Tensor, device, s: RecoveryPlan, what: str = "the adapter") -> None:
    """Before anything is published: every adapter tensor is finite, and the model with it gives
    finite logits on `ids` (finite factors can still multiply past the float range)."""
    for name, module in lora.items():
        for part in ("lora_A", "lora_B"):
            if not torch.isfinite(getattr(module, part)).all():
                raise _diverged(f"{what}'s {name}.{part} holds NaN/Inf", s)
    logits = model(input_ids=ids.to(device)).logits
    if not torch.isfinite(logits).all():
        raise _diverged(f"the model with {what} gives NaN/Inf logits", s)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def recover(run_dir: Path, cfg: DictConfig) -> dict:
    """Recover the output in `run_dir` as `cfg.recovery` says; returns its report section."""
    start = time.perf_counter()
    # Through a symbolic link too, the lock, the work folder and the published paths are those
    # of the folder itself: a second recovery by another spelling of the path is refused.
    run_dir = Path(run_dir).expanduser().resolve()
    settings = load_settings(cfg)  # the run's config and the recovery section, every field checked
    s = recovery_plan(settings)
    check_run_dir(run_dir)
    claim = RecoveryClaim(run_dir) if launch_rank(settings.trainer.devices) == 0 else None
    if claim is not None:
        claim.acquire()  # before anything is read or written: no other run changes RUN_DIR meanwhile
    try:
        return _recover(run_dir, cfg, settings, s, claim, start)
    finally:
        if claim is not None:
            claim.release()  # a failure publishes nothing: this run's staging folders go


def _recover(run_dir: Path, cfg: DictConfig, settings, s: RecoveryPlan, claim: RecoveryClaim | None,
             start: float) -> dict:
    if settings.cache.heap == "compact":  # freed tensors go back to the OS at once, as in the run (peak RSS)
        return_large_blocks_to_os()
    world = settings.trainer.world_size
    glob = s.train.global_batch(world)
    run = read_run(run_dir)
    unquantized = [n for n in run.config["quantization_config"].get("ignore") or [] if not n.startswith("re:")]
    targets = select_targets(run.quantized, s.target_modules, unquantized)
    check_rank(s.rank, run.quantized, targets)
    source = resolve_model_source(cfg.model.path)
    check_model_files(source)
    max_positions = run.config.get("max_position_embeddings")
    if max_positions and s.seq_len > max_positions:
        raise FabricqError(f"recovery.seq_len={s.seq_len} exceeds the model's context length {max_positions}")

    fabric, _ = runtime.launch(settings, run_dir)
    rank, device = fabric.global_rank, fabric.device
    peaks = PhasePeaks()
    torch.manual_seed(s.train.seed)
    timings: dict[str, float] = {"setup_s": time.perf_counter() - start}  # checks, imports, Fabric launch
    tick = time.perf_counter()
    tokenizer = load_tokenizer(source)
    text = prepare_text(tokenizer, cfg.data, cfg.eval)
    windows = recovery_text(tokenizer, cfg, s, s.train.steps * glob) if s.train.steps else None
    release_freed_memory()  # the tokenizer's buffers of whole-corpus encodings
    # The work folder is resumed from only for the same base, teacher, text and settings.
    work = recovery_work_dir(run_dir)
    identity = recovery_identity(run_dir, source, windows, s, targets, world, str(cfg.model.dtype))
    discard = check_work(work, identity, settings.resume)
    fabric.barrier()  # every rank has looked before rank 0 changes it
    if rank == 0:
        prepare_work(work, identity, discard)
    fabric.barrier()
    model = load_model(source, cfg.model.dtype)
    modules = dict(model.named_modules())
    _check_belongs(modules, run, source.name)
    position = {n: i for i, n in enumerate(modules)}
    targets.sort(key=position.__getitem__)
    linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    check_finite_weights(model, targets)
    timings["prepare_s"] = time.perf_counter() - tick
    peaks.end("prepare")

    # The teacher: top-k targets of this rank's windows, and the evaluation reference.
    tick = time.perf_counter()
    local = windows[local_window_order(s.train, world, rank)] if windows is not None else None
    targets_kl = None
    if s.needs_teacher:
        path = work / f"teacher.rank{rank}.safetensors"
        targets_kl = teacher_mod.load_teacher(path)
        if not teacher_mod.teacher_matches(targets_kl, local, s.top_k, s.train.temperature):
            teacher_mod.check_head(model, local[0], device)
            model.to(device)
            targets_kl = teacher_mod.compute_teacher(model, local, k=s.top_k, temperature=s.train.temperature,
                                                     device=device, desc="Teacher" if rank == 0 else None)
            teacher_mod.save_teacher(targets_kl, path)
    timings["teacher_s"] = time.perf_counter() - tick
    peaks.end("teacher")
    reference_file, before, base, eval_s = work / f"reference.rank{rank}.safetensors", None, None, 0.0
    if cfg.eval.enabled:
        tick = time.perf_counter()
        cache = reference_cache(settings.eval, model_identity(source), text.evaluation, model.dtype, device)
        base = run_base_result(run.report, cache)
        model.to(device)
        before, reference = original_reference(fabric, model, text, settings.eval, run.report, cache)
        # Full-vocabulary log-probs (hundreds of MiB): on disk until the evaluation at the end.
        save_file(reference_tensors(reference), reference_file)
        del reference
        eval_s = time.perf_counter() - tick
    model.to("cpu")
    peaks.end("reference")

    # The student: the exported base with adapters over the target modules.
    tick = time.perf_counter()
    original = {n: modules[n].weight.detach() for n in targets}
    drop_mapped_pages(p for p in model.parameters())
    lora = build_student(model, run, targets, s)
    run.tensors = {}  # copied into the model
    if not s.merge:  # the adapters hold the bases now; only a merge reads the codes again
        run.quantized = {}
    eora_stats = {}
    if s.init == "eora":
        # The first eora_samples of the run's calibration windows (all of them when it had fewer).
        calib = text.calibration[: s.eora_samples].tensor_split(world)[rank]
        model.to(device)
        eora_stats = eora.initialize(model, lora, original, calib, batch_size=cfg.data.batch_size, device=device,
                                     damp=s.damp, reduce=rank_reducer(fabric),
                                     release=drop_mapped_pages, rank=rank, world_size=world)
    del original, modules
    gc.collect()
    timings["eora_s"] = time.perf_counter() - tick
    peaks.end("student")

    result = None
    if s.train.steps:
        model.train()
        result = train(fabric, model, lora, local, targets_kl, settings=s.train,
                       store=CheckpointStore(work / "checkpoints"), identity=identity_hash(identity),
                       alpha=s.alpha)
        model.eval()
        timings["train_s"] = result.wall_s
    peaks.end("train")
    # Nothing non-finite is published: the adapter, and the model with it on one window (the same
    # on every rank, so all ranks agree).
    probe = text.calibration[:1, : s.seq_len]
    model.to(device)
    check_finite_adapter(model, lora, probe, device, s)
    model.to("cpu")
    adapter_dir = run_dir / ADAPTER_DIR
    merged_dir = run_dir / MERGED_DIR
    staged = {}
    if rank == 0:
        staged[ADAPTER_DIR] = save_peft_adapter(claim.staging(ADAPTER_DIR), lora, linear, base_model=str(run_dir.resolve()))
        if s.merge:
            staged[MERGED_DIR] = claim.staging(MERGED_DIR)
    if world > 1:  # the evaluation below reads rank 0's staging folders
        staged = fabric.broadcast(staged, src=0)
    fabric.barrier()
    if s.merge:
        tick = time.perf_counter()
        model.to(device)
        merged = merge_adapters(model, lora, run.quantized, text.calibration[: s.eora_samples].tensor_split(world)[rank],
                                batch_size=cfg.data.batch_size, device=device, damp=s.damp, reduce=rank_reducer(fabric))
        model.to("cpu")
        restore_linear(model, lora, model.dtype)
        model.to(device)
        with torch.no_grad():
            if not torch.isfinite(model(input_ids=probe.to(device)).logits).all():
                raise _diverged("the merged model gives NaN/Inf logits", s)
        model.to("cpu")
        if rank == 0:
            write_merged(model, {**run.quantized, **merged}, staged[MERGED_DIR], tokenizer, cfg.export)
        fabric.barrier()
        del merged
        timings["merge_s"] = time.perf_counter() - tick
    peaks.end("merge" if s.merge else "adapter")
    wall = time.perf_counter() - start - eval_s  # evaluation is reported apart
    peak_before_eval = max(peaks.peaks.values())  # teacher / EoRA / training, not evaluation
    compute_dtype = model.dtype  # the exported tensors are evaluated in it, as the run evaluated them
    del model, lora, targets_kl, local
    gc.collect()
    release_freed_memory()  # the student's small tensors, before the served model is loaded

    section = {
        "method": s.method, "rank": s.rank, "alpha": s.alpha, "init": s.init, "modules": len(targets),
        "steps": s.train.steps, "global_batch": glob, "seq_len": s.seq_len, "loss": s.train.loss,
        "lr": s.train.lr, "world_size": world, "adapter": str(adapter_dir), "wall_s": wall,
        "timings": timings, "peak_rss_mib": peak_before_eval,
        "tokens": result.tokens if result else 0, "tokens_per_s": result.tokens_per_s if result else None,
        "loss_curve": result.loss_curve if result else [], "resumed_from_step": result.resumed_from_step if result else None,
        "merged": str(merged_dir) if s.merge else None,
    }
    if eora_stats:
        total_before = sum(v["error_before"] for v in eora_stats.values())
        total_after = sum(v["error_after"] for v in eora_stats.values())
        section["eora"] = {"weighted_error_before": total_before, "weighted_error_after": total_after,
                           "modules_improved": sum(v["error_after"] < v["error_before"] for v in eora_stats.values())}
    if cfg.eval.enabled:
        # Measured on the staged folders, through the loading path users take: a result that
        # turns out non-finite is never published.
        tick = time.perf_counter()
        reference = reference_from_tensors(load_file(reference_file))
        served = for_evaluation(load_with_adapter(run_dir, staged[ADAPTER_DIR], dtype=compute_dtype), device)
        stride = settings.eval.stride
        recovered = evaluate_sharded(fabric, served, text.evaluation, device, reference=reference,
                                     desc="Perplexity after recovery", stride=stride)
        if base is None:  # the run did not measure the base on these windows and this reference
            with served.disable_adapter():
                base = evaluate_sharded(fabric, served, text.evaluation, device, reference=reference,
                                        desc="Perplexity after", stride=stride)
        del served
        if _finite(base["ppl"]) and not _finite(recovered["ppl"]):
            raise _diverged(f"the perplexity with the adapter is {recovered['ppl']} (without it {base['ppl']:.3f})", s)
        if s.merge:
            from fabricq.recovery.adapter import load_served

            served = for_evaluation(load_served(staged[MERGED_DIR], dtype=compute_dtype), device)
            after_merge = evaluate_sharded(fabric, served, text.evaluation, device, reference=reference,
                                           desc="Perplexity after merge", stride=stride)
            del served
            if _finite(base["ppl"]) and not _finite(after_merge["ppl"]):
                raise _diverged(f"the merged model's perplexity is {after_merge['ppl']}", s)
            section.update(ppl_after_merge=after_merge["ppl"], kl_after_merge=after_merge["kl"],
                           ppl_merge_gap_closed=gap_closed(before["ppl"], base["ppl"], after_merge["ppl"]),
                           kl_merge_gap_closed=gap_closed(0.0, base["kl"], after_merge["kl"]))
        section.update(ppl_before=before["ppl"], ppl_after=base["ppl"], kl_after=base["kl"],
                       ppl_after_recovery=recovered["ppl"], kl_after_recovery=recovered["kl"],
                       kl_after_recovery_lower_bound=recovered["kl_lower_bound"],
                       reference_windows_cached=before.get("cached_windows", 0),
                       ppl_gap_closed=gap_closed(before["ppl"], base["ppl"], recovered["ppl"]),
                       kl_gap_closed=gap_closed(0.0, base["kl"], recovered["kl"]), eval_tokens=recovered["tokens"])
        timings["eval_s"] = eval_s + time.perf_counter() - tick
        peaks.end("evaluation")
        section["peak_rss_eval_mib"] = peaks.peaks["evaluation"]  # the evaluation after recovery
    section["peak_rss_by_phase_mib"] = peaks.peaks
    fabric.barrier()  # every rank is done with the staged folders
    if rank == 0:
        report = read_report(run_dir)
        report["recovery"] = section
        claim.publish(report)  # adapter (and merged model) swapped in, then report.json: strict JSON
        shutil.rmtree(work, ignore_errors=True)
    runtime.finish(fabric)
    if _finite(section.get("ppl_after_recovery")):
        log.info("Recovery: perplexity %.3f → %.3f (before quantization %.3f), KL %.5f → %.5f; %s of the perplexity gap "
                 "closed", section["ppl_after"], section["ppl_after_recovery"], section["ppl_before"],
                 section["kl_after"], section["kl_after_recovery"],
                 "n/a" if section["ppl_gap_closed"] is None else f"{100 * section['ppl_gap_closed']:.1f}%")
    log.info("Wrote %s (recovery %.1f s, peak RSS %.0f MiB)", adapter_dir, wall, peak_before_eval)
    return section


def read_report(run_dir: Path) -> dict:
    """RUN_DIR's report.json as it is now (a JSON object, or a one-line error)."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError) as err:
        raise FabricqError(f"RUN_DIR {run_dir} is corrupted: report.json cannot be read ({err})") from None
    if not isinstance(report, dict):
        raise FabricqError(f"RUN_DIR {run_dir} is corrupted: report.json is not a JSON object")
    return report
