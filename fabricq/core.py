"""The calibration core every front end runs: the command line (`fabricq.app`), the Python API
(`fabricq.api`) and the Lightning callback (`fabricq.lightning`) — one layer loop, one GPTQ, one
rank logic over an in-memory model and token windows, on the ranks of a Fabric (or alike: what is
used of it is `world_size`, `global_rank`, `device`, `barrier`, `broadcast`; collectives go
through torch.distributed's default process group)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fabricq.calibration.cache import ActivationCache
from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.base import Callback
from fabricq.callbacks.checkpoint import CheckpointCallback
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.callbacks.progress import ProgressCallback
from fabricq.callbacks.release import ReleaseFinishedWeights
from fabricq.config import Settings
from fabricq.errors import FabricqError
from fabricq.models import (
    check_finite_weights,
    check_something_quantized,
    decoder_layers,
    layer_prefix,
    linear_modules,
)
from fabricq.parallel.exchange import agreed_finished_layer, gather_totals
from fabricq.parallel.plan import local_samples
from fabricq.parallel.solvers import make_solver
from fabricq.quant.grid import QuantScheme

log = logging.getLogger("fabricq")

HESSIAN_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # config.HESSIAN_DTYPES


def gptq_settings(config: Settings) -> GPTQSettings:
    """What the GPTQ callbacks read, from the checked settings."""
    q = config.quant
    return GPTQSettings(
        method=q.method,
        scheme=QuantScheme(q.bits, q.group_size, q.symmetric, q.actorder),
        damp=float(q.damp),
        block_size=q.block_size,
        hessian_dtype=HESSIAN_TORCH_DTYPES[q.hessian_dtype],
        ignore=q.ignore,
        solve_threads=config.pipeline.solve_threads,
        true_sequential=q.true_sequential,
    )


def check_recovery_against(model: nn.Module, config: Settings, settings: GPTQSettings,
                           targets: list[str] | None = None) -> None:
    """+recovery=…: its settings (rank, target modules, …) against the modules this run will
    quantize. Only the modules' shapes are read, so a model on the meta device built from
    config.json is enough: the run checks this before it loads any weight."""
    if getattr(config, "recovery", None) is None:
        return
    from fabricq.recovery.lora import check_recovery_plan

    check_recovery_plan(config.recovery, model, quantization_targets(model) if targets is None else targets,
                        settings.ignore)


def quantization_targets(model: nn.Module) -> list[str]:
    """The decoder layers' Linear modules, by name, in layer order."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    return [name for i, layer in enumerate(layers) for name in linear_modules(layer, f"{prefix}.{i}")]


def plan_model(model: nn.Module, config: Settings, settings: GPTQSettings) -> tuple[list[str], torch.dtype]:
    """The Linear modules to quantize and the export dtype, after every check that needs the model
    (finite weights, quant.ignore, what the export formats can hold); sets `settings.scale_dtype`."""
    from fabricq.checkpoint.engines import (
        check_export_config,
        preflight,
        resolve_export_dtype,
        scale_dtype_for,
    )

    check_export_config(config.export, config.quant)
    targets = quantization_targets(model)
    check_finite_weights(model, targets)
    check_something_quantized(targets, settings.ignore)
    check_recovery_against(model, config, settings, targets)
    modules = dict(model.named_modules())
    shapes = {name: (modules[name].out_features, modules[name].in_features) for name in targets}
    for verdict in preflight(config.export, settings.scheme, shapes, model.dtype, settings.ignore):
        log.info("Pre-flight %s", verdict.line())
    export_dtype = resolve_export_dtype(config.export.dtype, model.dtype)
    settings.scale_dtype = scale_dtype_for(config.export.format, export_dtype)  # stored exactly
    return targets, export_dtype


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------


@dataclass
class OneProcess:
    """What fabricq uses of a Fabric, for one process without one."""

    device: torch.device
    world_size: int = 1
    global_rank: int = 0

    def barrier(self) -> None: ...

    def broadcast(self, obj, src: int = 0):
        return obj


def agree(ranks, problem: str | None) -> None:
    """Raise `problem` (or the first rank's) on every rank together: a rank raising alone would
    leave the others waiting in the next collective."""
    if ranks.world_size > 1:
        problems = [None] * ranks.world_size
        torch.distributed.all_gather_object(problems, problem)
        failed = [(r, p) for r, p in enumerate(problems) if p]
        problem = f"rank {failed[0][0]}: {failed[0][1]}" if failed else None
    if problem:
        raise FabricqError(problem)


# ---------------------------------------------------------------------------------------------
# The core: calibrate and quantize an in-memory model
# ---------------------------------------------------------------------------------------------


class KeepOriginals(Callback):
    """Copies of each layer's Linear weights taken before the layer changes, so that a failure
    leaves the model as it was (`restore`) instead of half quantized."""

    def __init__(self):
        self.originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_layer_start(self, loop, index, layer):
        for name, module in linear_modules(layer, loop.layer_name(index)).items():
            self.originals[name] = (module.weight.data, module.weight.data.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for weight, copy in self.originals.values():
                weight.copy_(copy)
        self.originals.clear()


@dataclass
class Calibrated:
    gptq: GPTQCallback
    release: ReleaseFinishedWeights | None
    report: dict = field(default_factory=dict)  # cache, distributed, resumed_after_layer
    timings: dict = field(default_factory=dict)


def calibrate_and_quantize(model: nn.Module, windows: torch.Tensor, config: Settings, settings: GPTQSettings, ranks, *,
                           attention_mask: torch.Tensor | None = None, shard: bool = True,
                           cache: ActivationCache | None = None, work=None, resuming: bool = False,
                           release_dense: bool = False, restore_on_failure: bool = True) -> Calibrated:
    """The layer loop with GPTQ on it over `windows` (N, T), on the ranks of `ranks` (a Fabric or
    alike). `shard`: every rank holds the same windows and calibrates its share of the batches
    (the command line); False: each rank passed its own. `work`: the resume work directory (the
    command line), from whose last committed layer a resumed run continues. `release_dense`:
    finished layers keep only their codes (`ReleaseFinishedWeights`). `restore_on_failure`: a
    failure puts the original weights back."""
    tick = time.perf_counter()
    world, rank, device = ranks.world_size, ranks.global_rank, ranks.device
    batch_size = config.data.batch_size
    solver = make_solver(settings, world, rank, device)
    gptq = GPTQCallback(settings, solver=solver)
    release = ReleaseFinishedWeights(gptq) if release_dense else None  # dense copies of finished layers: not kept
    originals = KeepOriginals() if restore_on_failure else None
    callbacks = [c for c in (originals, gptq, ProgressCallback(), work and CheckpointCallback(work, gptq), release) if c]
    if shard:  # each rank calibrates on its own whole batches (disjoint shards of the one-rank batches)
        windows = local_samples(windows, batch_size, rank, world)
        if attention_mask is not None:
            attention_mask = local_samples(attention_mask, batch_size, rank, world)
    cache = cache if cache is not None else ActivationCache(device)
    loop = CalibrationLoop(model, windows, device=device, batch_size=batch_size, callbacks=callbacks, cache=cache,
                           attention_mask=attention_mask)
    result = Calibrated(gptq, release)
    start_layer, inputs = 0, None
    finished = work.latest_finished_layer() if work is not None and resuming else None
    if world > 1 and work is not None:  # ranks continue from the last layer every one of them finished
        finished = agreed_finished_layer(finished, device)
    if finished is not None:
        inputs = work.restore(finished, model, gptq, cache)
        start_layer = finished + 1
        result.report["resumed_after_layer"] = finished
        log.info("Resuming %s after layer %d/%d", work.path, finished + 1, loop.num_layers)
    training = model.training
    model.eval()  # no dropout in the calibration forwards
    try:
        loop.run(start_layer, inputs)
    except BaseException:
        if originals is not None:
            originals.restore()
        raise
    finally:
        model.train(training)
        gptq.close()
        cache.close()
    result.report["cache"] = cache.report()
    result.timings["quantize_s"] = time.perf_counter() - tick
    result.timings["solve_steps_s"] = gptq.solve_steps_s
    if solver.report is not None:
        result.report["distributed"] = {**solver.report, **gather_totals(ranks, solver.report["bytes_sent"])}
    return result


