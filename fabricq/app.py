"""One fabricq run: validate the config, calibrate and quantize, evaluate, export, report.

Thin orchestration over the other modules; every check on user input happens before the model is
loaded, and the output directory only appears, complete, at the very end.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq import runtime
from fabricq.calibration.cache import cache_from_config, check_budgets
from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.checkpoint import CheckpointCallback
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.callbacks.progress import ProgressCallback
from fabricq.callbacks.release import ReleaseFinishedWeights
from fabricq.data import check_text_path, prepare_text
from fabricq.errors import FabricqError
from fabricq.sysmem import drop_mapped_pages, return_large_blocks_to_os
from fabricq.models import (
    DTYPES,
    check_finite_weights,
    check_model_files,
    decoder_layers,
    layer_prefix,
    linear_modules,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from fabricq.quant.grid import ACTORDERS, SUPPORTED_BITS, QuantScheme
from fabricq.evaluate import evaluate_sharded
from fabricq.parallel.exchange import agreed_finished_layer, gather_totals
from fabricq.parallel.plan import local_samples
from fabricq.parallel.solvers import DistributedGPTQCallback
from fabricq.resume import (
    RESUME_MODES,
    WorkDirectory,
    config_identity,
    data_identity,
    model_identity,
    work_dir_for,
)

log = logging.getLogger("fabricq")

METHODS = ("gptq", "rtn")
HEAP_POLICIES = ("compact", "fast")
HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _positive_int(value, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FabricqError(f"{field} must be a positive integer, got {value!r}")


def validate_config(cfg: DictConfig) -> GPTQSettings:
    """Check every user-facing field; return the quantization settings they describe."""
    q = cfg.quant
    if q.method not in METHODS:
        raise FabricqError(f"quant.method must be one of {METHODS}, got {q.method!r}")
    if q.bits not in SUPPORTED_BITS:
        raise FabricqError(f"quant.bits must be one of {SUPPORTED_BITS}, got {q.bits!r}")
    if not isinstance(q.group_size, int) or not (q.group_size == -1 or q.group_size > 0):
        raise FabricqError(f"quant.group_size must be a positive integer or -1 (per-channel), got {q.group_size!r}")
    if q.actorder not in ACTORDERS:
        raise FabricqError(f"quant.actorder must be one of {ACTORDERS}, got {q.actorder!r}")
    if not isinstance(q.damp, (int, float)) or not q.damp > 0:
        raise FabricqError(f"quant.damp must be a positive number, got {q.damp!r}")
    _positive_int(q.block_size, "quant.block_size")
    if q.hessian_dtype not in HESSIAN_DTYPES:
        raise FabricqError(f"quant.hessian_dtype must be one of {sorted(HESSIAN_DTYPES)}, got {q.hessian_dtype!r}")
    for name in ("num_samples", "seq_len", "batch_size"):
        _positive_int(cfg.data[name], f"data.{name}")
    if cfg.eval.enabled and cfg.eval.path is None and not 0 < cfg.data.eval_fraction < 1:
        raise FabricqError(f"data.eval_fraction must be between 0 and 1, got {cfg.data.eval_fraction!r}")
    _positive_int(cfg.eval.seq_len, "eval.seq_len")
    if cfg.eval.max_windows is not None:
        _positive_int(cfg.eval.max_windows, "eval.max_windows")
    if cfg.model.dtype != "auto" and cfg.model.dtype not in DTYPES:
        raise FabricqError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
    check_text_path(cfg.data.path, "data.path")
    check_text_path(cfg.eval.path, "eval.path")
    if cfg.export.format != "compressed-tensors":
        raise FabricqError(f"export.format must be compressed-tensors, got {cfg.export.format!r}")
    if cfg.resume not in RESUME_MODES:
        raise FabricqError(f"resume must be auto, true or false, got {cfg.resume!r}")
    if not isinstance(cfg.pipeline.prefetch, bool):
        raise FabricqError(f"pipeline.prefetch must be true or false, got {cfg.pipeline.prefetch!r}")
    _positive_int(cfg.pipeline.solve_threads, "pipeline.solve_threads")
    if cfg.pipeline.lag not in (0, 1) or isinstance(cfg.pipeline.lag, bool):
        raise FabricqError(f"pipeline.lag must be 0 or 1, got {cfg.pipeline.lag!r}")
    check_budgets(0, cfg.cache.device_mib, cfg.cache.host_mib, "")
    if cfg.cache.heap not in HEAP_POLICIES:
        raise FabricqError(f"cache.heap must be one of {HEAP_POLICIES}, got {cfg.cache.heap!r}")
    if not isinstance(q.true_sequential, bool):
        raise FabricqError(f"quant.true_sequential must be true or false, got {q.true_sequential!r}")
    budgets = {k: v for k, v in (("cache.device_mib", cfg.cache.device_mib), ("cache.host_mib", cfg.cache.host_mib))
               if v is not None}
    if q.true_sequential and q.method == "gptq" and budgets:
        raise FabricqError(
            f"quant.true_sequential=true holds every batch's activations inside a layer at once, so "
            f"{' and '.join(budgets)} cannot be honoured: set quant.true_sequential=false to use cache budgets"
        )
    if cfg.pipeline.lag and q.true_sequential and q.method == "gptq":
        raise FabricqError(
            "pipeline.lag=1 calibrates each layer on the previous layer's unquantized outputs, which the "
            "one-forward true-sequential mode cannot do: set quant.true_sequential=false with pipeline.lag=1"
        )
    runtime.validate_trainer(cfg.trainer, cfg.data)
    runtime.solve_window_of(cfg.trainer, cfg.pipeline.lag)
    return GPTQSettings(
        method=q.method,
        scheme=QuantScheme(q.bits, q.group_size, q.symmetric, q.actorder),
        damp=float(q.damp),
        block_size=q.block_size,
        hessian_dtype=HESSIAN_DTYPES[q.hessian_dtype],
        ignore=tuple(q.ignore),
        solve_threads=cfg.pipeline.solve_threads,
        true_sequential=q.true_sequential,
    )


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FabricqError(f"output_dir is a file, not a directory: {path}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FabricqError(
            f"output_dir {path} exists and is not empty: choose another directory or pass overwrite=true"
        )


def publish(staging: Path, final: Path) -> None:
    """Move a finished staging directory into place, replacing `final` only now."""
    if final.exists():
        if final.is_dir() and any(final.iterdir()):
            shutil.rmtree(final)
        else:
            final.rmdir()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Quantize the configured model and write checkpoint + report.json into `output_dir`."""
    from fabricq.export import save_compressed_checkpoint

    start = time.perf_counter()
    timings: dict[str, float] = {}
    settings = validate_config(cfg)
    if cfg.cache.heap == "compact":  # freed tensors go back to the OS at once (peak RSS)
        return_large_blocks_to_os()
    check_output_dir(output_dir, cfg.overwrite)
    source = resolve_model_source(cfg.model.path)
    model_config = check_model_files(source)
    max_positions = model_config.get("max_position_embeddings")
    if max_positions and cfg.eval.seq_len > max_positions:
        raise FabricqError(f"eval.seq_len={cfg.eval.seq_len} exceeds the model's context length {max_positions}")
    if max_positions and cfg.data.seq_len > max_positions:
        raise FabricqError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context length {max_positions}")

    # Ranks: Fabric launches them (or torchrun/SLURM did); they agree on config and output_dir.
    fabric, output_dir = runtime.launch(cfg, output_dir)
    world, rank = fabric.world_size, fabric.global_rank
    torch.manual_seed(cfg.seed)

    tick = time.perf_counter()
    tokenizer = load_tokenizer(source)
    text = prepare_text(tokenizer, cfg.data, cfg.eval)
    # Resume: the work directory beside the output must be this run's, or new.
    work = WorkDirectory(work_dir_for(output_dir), rank, world)
    identity = {"config": config_identity(cfg), "model": model_identity(source),
                "data_sha256": data_identity(text.calibration), "world_size": world}
    resuming = work.prepare(cfg.resume, identity)
    if world > 1:  # rank 0 may have discarded an old run: nobody writes before that is done
        fabric.barrier()
    cache = cache_from_config(cfg, model_config, work, fabric.device) if model_config else None
    model = load_model(source, cfg.model.dtype)
    if cache is None:  # the default (GGUF) model: its config is known once loaded
        cache = cache_from_config(cfg, model.config.to_dict(), work, fabric.device)
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    targets = [name for i, layer in enumerate(layers) for name in linear_modules(layer, f"{prefix}.{i}")]
    check_finite_weights(model, targets)
    modules = dict(model.named_modules())
    # Reading every weight paged the loader's memory map in; each layer's pages come back when
    # the layer is calibrated, the rest need not be resident meanwhile (peak RSS).
    drop_mapped_pages(modules[name].weight for name in targets)
    timings["load_s"] = time.perf_counter() - tick
    log.info(
        "Model %s: %d decoder layers, %d Linear modules; calibration %d × %d tokens",
        source.name, len(layers), len(targets), *text.calibration.shape,
    )

    report: dict = {}
    reference = None
    if cfg.eval.enabled:
        tick = time.perf_counter()
        model.to(fabric.device)
        before = evaluate_sharded(
            fabric, model, text.evaluation, fabric.device, keep=cfg.eval.kl_windows, desc="Perplexity before"
        )
        model.to("cpu")
        drop_mapped_pages(modules[name].weight for name in targets)
        reference = before.pop("logprobs")
        report["ppl_before"] = before["ppl"]
        report["eval_tokens"] = before["tokens"]
        timings["eval_before_s"] = time.perf_counter() - tick
        log.info("Perplexity before: %.3f (%d tokens)", before["ppl"], before["tokens"])

    tick = time.perf_counter()
    if world > 1 and settings.method == "gptq":
        gptq = DistributedGPTQCallback(
            settings, rank=rank, world_size=world, device=fabric.device,
            upper_triangle=cfg.trainer.hessian_upper_triangle,
            use_measurements=cfg.trainer.balance == "measured",
            solve_window=runtime.solve_window_of(cfg.trainer, cfg.pipeline.lag),
        )
    else:
        gptq = GPTQCallback(settings)
    # Each rank calibrates on its own whole batches (disjoint shards of the one-rank batches).
    release = ReleaseFinishedWeights(gptq)  # dense copies of finished layers: not kept
    samples = local_samples(text.calibration, cfg.data.batch_size, rank, world)
    loop = CalibrationLoop(
        model, samples, device=fabric.device, batch_size=cfg.data.batch_size,
        callbacks=[gptq, ProgressCallback(), CheckpointCallback(work, gptq), release],
        cache=cache, prefetch=cfg.pipeline.prefetch, lag=cfg.pipeline.lag,
    )
    start_layer, inputs = 0, None
    finished = work.latest_finished_layer() if resuming else None
    if world > 1:  # ranks continue from the last layer every one of them finished
        finished = agreed_finished_layer(finished, fabric.device)
    if finished is not None:
        inputs = work.restore(finished, model, gptq, cache)
        start_layer = finished + 1
        report["resumed_after_layer"] = finished
        log.info("Resuming %s after layer %d/%d", work.path, finished + 1, len(layers))
    try:
        loop.run(start_layer, inputs)
    finally:
        gptq.close()
        cache.close()
    report["cache"] = cache.report()
    timings["quantize_s"] = time.perf_counter() - tick
    timings["solve_steps_s"] = gptq.solve_steps_s

    if cfg.eval.enabled:
        tick = time.perf_counter()
        release.restore(model)
        model.to(fabric.device)
        after = evaluate_sharded(
            fabric, model, text.evaluation, fabric.device, reference=reference, desc="Perplexity after"
        )
        model.to("cpu")
        report["ppl_after"] = after["ppl"]
        report["kl_after"] = after["kl"]
        timings["eval_after_s"] = time.perf_counter() - tick
        log.info("Perplexity after: %.3f · KL %.5f", after["ppl"], after["kl"])

    if isinstance(gptq, DistributedGPTQCallback):
        report["distributed"] = {**gptq.report, **gather_totals(fabric, gptq)}
    if rank != 0:  # only rank 0 writes; the others wait for it at the final barrier
        runtime.finish(fabric)
        return report
    tick = time.perf_counter()
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_compressed_checkpoint(model, gptq.quantized, staging, tokenizer)
    timings["export_s"] = time.perf_counter() - tick

    report.update(
        model=source.name,
        method=settings.method,
        scheme=OmegaConf.to_container(cfg.quant, resolve=True),
        calibration={
            "samples": int(text.calibration.shape[0]),
            "seq_len": int(text.calibration.shape[1]),
            # Fingerprint of the exact token windows, so other tools can be fed the same.
            "sha256": identity["data_sha256"],
        },
        wall_s=time.perf_counter() - start,
        peak_rss_mib=peak_rss_mib(),
        timings=timings,
        modules=gptq.stats,
    )
    (staging / "report.json").write_text(json.dumps(report, indent=2))
    (staging / "fabricq_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    publish(staging, output_dir)
    work.remove()
    runtime.finish(fabric)
    log.info("Wrote %s (%.1f s, peak RSS %.0f MiB)", output_dir, report["wall_s"], report["peak_rss_mib"])
    return report
