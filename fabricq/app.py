"""One fabricq run: validate the config, calibrate and quantize, evaluate, export, report.

Thin orchestration over the other modules; every check on user input happens before the model is
loaded, and the output directory only appears, complete, at the very end.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq import runtime
from fabricq.calibration.cache import cache_from_config
from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.checkpoint import CheckpointCallback
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.callbacks.progress import ProgressCallback
from fabricq.callbacks.release import ReleaseFinishedWeights
from fabricq.config import Settings, load_settings
from fabricq.recover import recover_after_run
from fabricq.data import prepare_text
from fabricq.errors import FabricqError
from fabricq.output import check_output_dir, claim_output, releases_output_claims
from fabricq.sysmem import drop_mapped_pages, return_large_blocks_to_os
from fabricq.models import (
    check_finite_weights,
    check_model_files,
    check_something_quantized,
    decoder_layers,
    layer_prefix,
    linear_modules,
    load_model,
    load_tokenizer,
    resolve_model_source,
    saved_dtype,
)
from fabricq.precision import decide_precision
from fabricq.quant.gram import enable_bf16_products
from fabricq.quant.grid import QuantScheme
from fabricq.evaluate import evaluate_sharded
from fabricq.parallel.exchange import agreed_finished_layer, gather_totals
from fabricq.parallel.plan import local_samples
from fabricq.parallel.solvers import make_solver
from fabricq.resume import (
    WorkDirectory,
    config_identity,
    data_identity,
    model_identity,
    work_dir_for,
)

log = logging.getLogger("fabricq")

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def gptq_settings(config: Settings) -> GPTQSettings:
    """What the GPTQ callbacks read, from the checked settings."""
    q = config.quant
    return GPTQSettings(
        method=q.method,
        scheme=QuantScheme(q.bits, q.group_size, q.symmetric, q.actorder),
        damp=float(q.damp),
        block_size=q.block_size,
        hessian_dtype=HESSIAN_DTYPES[q.hessian_dtype],
        ignore=q.ignore,
        solve_threads=config.pipeline.solve_threads,
        true_sequential=q.true_sequential,
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@releases_output_claims  # the output lock, and cleanup after a failure
def run(cfg: DictConfig, output_dir: Path, config: Settings | None = None) -> dict:
    """Quantize the configured model and write checkpoint + report.json into `output_dir`.
    `config`: `cfg` already checked by `load_settings` (the command line does that first)."""
    from fabricq.serving import (check_export_config, preflight, resolve_export_dtype, round_unquantized,
                                 save_checkpoints, scale_dtype_for)

    start = time.perf_counter()
    timings: dict[str, float] = {}
    config = config or load_settings(cfg)  # every user-facing field, checked once
    settings = gptq_settings(config)
    check_export_config(config.export, config.quant)
    if config.cache.heap == "compact":  # freed tensors go back to the OS at once (peak RSS)
        return_large_blocks_to_os()
    check_output_dir(output_dir, config.overwrite)
    source = resolve_model_source(config.model.path)
    output = claim_output(output_dir, config, source)  # inputs outside it; locked for this run
    model_config = check_model_files(source)
    max_positions = model_config.get("max_position_embeddings")
    if max_positions and config.eval.enabled and config.eval.seq_len > max_positions:
        raise FabricqError(f"eval.seq_len={config.eval.seq_len} exceeds the model's context length {max_positions}")
    if max_positions and config.data.seq_len > max_positions:
        raise FabricqError(f"data.seq_len={config.data.seq_len} exceeds the model's context length {max_positions}")

    # Ranks: Fabric launches them (or torchrun/SLURM did); they agree on config and output_dir.
    fabric, output_dir = runtime.launch(config, output_dir)
    world, rank = fabric.world_size, fabric.global_rank
    torch.manual_seed(config.seed)

    tick = time.perf_counter()
    tokenizer = load_tokenizer(source)
    text = prepare_text(tokenizer, config.data, config.eval)
    # Resume: the work directory beside the output must be this run's, or new.
    work = WorkDirectory(work_dir_for(output_dir), rank, world)
    identity = {"config": config_identity(cfg), "model": model_identity(source),
                "data_sha256": data_identity(text.calibration), "world_size": world}
    resuming = work.prepare(config.resume, identity)
    if world > 1:  # rank 0 may have discarded an old run: nobody writes before that is done
        fabric.barrier()
    cache = cache_from_config(config, model_config, work, fabric.device) if model_config else None
    # Forward dtype and Hessian products from what this host measurably computes fast; every
    # rank runs rank 0's choice (their activations and Hessians must agree).
    precision = decide_precision(config.model.dtype, saved_dtype(source),
                                 quality_ok=config.quant.hessian_dtype == "float32")
    if world > 1:
        precision = fabric.broadcast(precision, src=0)
    enable_bf16_products(precision.bf16_hessian_products)
    model = load_model(source, precision.forward_dtype)
    if cache is None:  # the default (GGUF) model: its config is known once loaded
        cache = cache_from_config(config, model.config.to_dict(), work, fabric.device)
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    targets = [name for i, layer in enumerate(layers) for name in linear_modules(layer, f"{prefix}.{i}")]
    check_finite_weights(model, targets)
    check_something_quantized(targets, settings.ignore)
    modules = dict(model.named_modules())
    # Before any calibration: can the export formats hold these modules, will export.engine serve them?
    shapes = {name: (modules[name].out_features, modules[name].in_features) for name in targets}
    for verdict in preflight(config.export, settings.scheme, shapes, model.dtype, settings.ignore):
        log.info("Pre-flight %s", verdict.line())
    export_dtype = resolve_export_dtype(config.export.dtype, model.dtype)
    settings.scale_dtype = scale_dtype_for(config.export.format, export_dtype)  # stored exactly
    # Reading every weight paged the loader's memory map in; each layer's pages come back when
    # the layer is calibrated, the rest need not be resident meanwhile (peak RSS).
    drop_mapped_pages(modules[name].weight for name in targets)
    timings["load_s"] = time.perf_counter() - tick
    log.info(
        "Model %s: %d decoder layers, %d Linear modules; calibration %d × %d tokens",
        source.name, len(layers), len(targets), *text.calibration.shape,
    )

    report: dict = {"precision": {**precision.report(), "model_dtype": str(model.dtype).removeprefix("torch.")}}
    reference = None
    if cfg.eval.enabled:
        tick = time.perf_counter()
        model.to(fabric.device)
        before = evaluate_sharded(
            fabric, model, text.evaluation, fabric.device, keep=cfg.eval.kl_windows, desc="Perplexity before",
            stride=cfg.eval.stride,
        )
        model.to("cpu")
        drop_mapped_pages(modules[name].weight for name in targets)
        reference = before.pop("logprobs")
        report["ppl_before"] = before["ppl"]
        report["eval_tokens"] = before["tokens"]
        report["eval_convention"] = {**text.eval_convention, "tokens_scored": before["tokens"]}
        timings["eval_before_s"] = time.perf_counter() - tick
        log.info("Perplexity before: %.3f (%d tokens)", before["ppl"], before["tokens"])

    tick = time.perf_counter()
    solver = make_solver(settings, world, rank, fabric.device)
    gptq = GPTQCallback(settings, solver=solver)
    # Each rank calibrates on its own whole batches (disjoint shards of the one-rank batches).
    release = ReleaseFinishedWeights(gptq)  # dense copies of finished layers: not kept
    samples = local_samples(text.calibration, cfg.data.batch_size, rank, world)
    loop = CalibrationLoop(
        model, samples, device=fabric.device, batch_size=cfg.data.batch_size,
        callbacks=[gptq, ProgressCallback(), CheckpointCallback(work, gptq), release],
        cache=cache,
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
        round_unquantized(model, gptq.quantized, export_dtype)  # what the checkpoint holds
        model.to(fabric.device)
        after = evaluate_sharded(
            fabric, model, text.evaluation, fabric.device, reference=reference, desc="Perplexity after",
            stride=cfg.eval.stride,
        )
        model.to("cpu")
        report["ppl_after"] = after["ppl"]
        report["kl_after"] = after["kl"]
        timings["eval_after_s"] = time.perf_counter() - tick
        log.info("Perplexity after: %.3f · KL %.5f", after["ppl"], after["kl"])

    if solver.report is not None:
        report["distributed"] = {**solver.report, **gather_totals(fabric, solver.report["bytes_sent"])}
    if rank != 0:  # only rank 0 writes; the others wait for it at the final barrier
        runtime.finish(fabric)
        return report
    tick = time.perf_counter()
    staging = output.new_staging()
    report["export"] = {"formats": save_checkpoints(model, gptq.quantized, staging, tokenizer, config.export),
                        "dtype": str(export_dtype).removeprefix("torch.")}
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
    output.publish(staging)
    work.remove()
    runtime.finish(fabric)
    log.info("Wrote %s (%.1f s, peak RSS %.0f MiB)", output_dir, report["wall_s"], report["peak_rss_mib"])
    return recover_after_run(cfg, output_dir, report)  # +recovery=…: adapters over the published output
