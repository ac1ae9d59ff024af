"""One fabricq run, as four named phases: load → calibrate and quantize → evaluate → export.

`run` reads top to bottom; each phase is a function of the `Job` the first one builds. Every check
on user input happens before the model is loaded (`fabricq.config`), and the output directory only
appears, complete, at the very end (`fabricq.output`). The calibration itself is the one the Python
API and the Lightning callback run (`fabricq.core.calibrate_and_quantize`): this module adds the
files, the resume directory and the output around it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq import core, runtime
from fabricq.calibration.cache import ActivationCache, cache_from_config
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.callbacks.release import ReleaseFinishedWeights
from fabricq.config import Settings, load_settings
from fabricq.core import gptq_settings
from fabricq.data import TextData, prepare_text
from fabricq.errors import FabricqError
from fabricq.evaluate import evaluate_sharded
from fabricq.models import (
    ModelSource,
    check_model_files,
    decoder_layers,
    load_model,
    load_tokenizer,
    resolve_model_source,
    saved_dtype,
)
from fabricq.output import check_output_dir, claim_output, releases_output_claims
from fabricq.precision import decide_precision
from fabricq.quant.gram import enable_bf16_products
from fabricq.recover import recover_after_run
from fabricq.resume import (
    WorkDirectory,
    config_identity,
    data_identity,
    model_identity,
    work_dir_for,
)
from fabricq.sysmem import drop_mapped_pages, peak_rss_mib, return_large_blocks_to_os

log = logging.getLogger("fabricq")


@dataclass
class Job:
    """Everything the phases share: the checked config, this rank, the model and its text."""

    cfg: DictConfig
    config: Settings
    settings: GPTQSettings
    output: object  # fabricq.output's claim on output_dir: staging and publish
    output_dir: Path
    fabric: object
    source: ModelSource
    tokenizer: object
    text: TextData
    work: WorkDirectory
    identity: dict
    resuming: bool
    cache: ActivationCache
    model: torch.nn.Module
    targets: list[str]
    export_dtype: torch.dtype
    start: float
    report: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world(self) -> int:
        return self.fabric.world_size

    def drop_weight_pages(self) -> None:
        """Unchanged weights need not stay resident: each layer's pages come back when it is used."""
        modules = dict(self.model.named_modules())
        drop_mapped_pages(modules[name].weight for name in self.targets)


@releases_output_claims  # the output lock, and cleanup after a failure
def run(cfg: DictConfig, output_dir: Path, config: Settings | None = None) -> dict:
    """Quantize the configured model and write checkpoint + report.json into `output_dir`.
    `config`: `cfg` already checked by `load_settings` (the command line does that first)."""
    job = load(cfg, output_dir, config or load_settings(cfg))
    reference = evaluate_before(job)
    gptq, release = calibrate_and_quantize(job)
    evaluate_after(job, gptq, release, reference)
    report = export(job, gptq)
    return recover_after_run(cfg, job.output_dir, report)  # +recovery=…: adapters over the published output


def load(cfg: DictConfig, output_dir: Path, config: Settings) -> Job:
    """Checks that need the files, rank launch, tokenizer, text, the resume directory, the model."""
    from fabricq.checkpoint.engines import check_export_config

    start = time.perf_counter()
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
    if config.recovery is not None and model_config:  # before any weight is read (the default GGUF model: after)
        from fabricq.checkpoint.load import meta_model

        core.check_recovery_against(meta_model(model_config), config, settings)

    # Ranks: Fabric launches them (or torchrun/SLURM did); they agree on config and output_dir.
    fabric, output_dir = runtime.launch(config, output_dir)
    world, rank = fabric.world_size, fabric.global_rank
    torch.manual_seed(config.seed)

    tick = time.perf_counter()
    tokenizer = load_tokenizer(source)
    text = prepare_text(tokenizer, config.data, config.eval)
    # Resume: the work directory beside the output must be this run's, or new.
    work = WorkDirectory(work_dir_for(output_dir), rank, world)
    # Forward dtype and Hessian products from the saved dtype, the request and the CPU's flags;
    # every rank runs rank 0's choice (their activations and Hessians must agree).
    precision = decide_precision(config.model.dtype, saved_dtype(source), config.quant.hessian_dtype)
    if world > 1:
        precision = fabric.broadcast(precision, src=0)
    identity = {"config": config_identity(cfg), "model": model_identity(source),
                "data_sha256": data_identity(text.calibration), "world_size": world,
                "precision": precision.identity()}
    resuming = work.prepare(config.resume, identity)
    if world > 1:  # rank 0 may have discarded an old run: nobody writes before that is done
        fabric.barrier()
    cache = cache_from_config(config, model_config, work, fabric.device) if model_config else None
    enable_bf16_products(precision.bf16_hessian_products)
    model = load_model(source, precision.forward_dtype)
    if cache is None:  # the default (GGUF) model: its config is known once loaded
        cache = cache_from_config(config, model.config.to_dict(), work, fabric.device)
    layers = decoder_layers(model)
    # Before any calibration: can the export formats hold these modules, will export.engine serve them?
    targets, export_dtype = core.plan_model(model, config, settings)
    job = Job(cfg, config, settings, output, output_dir, fabric, source, tokenizer, text, work, identity,
              resuming, cache, model, targets, export_dtype, start)
    job.drop_weight_pages()  # the finiteness check paged every weight in
    job.timings["load_s"] = time.perf_counter() - tick
    job.report["precision"] = {**precision.report(), "model_dtype": str(model.dtype).removeprefix("torch.")}
    log.info("Model %s: %d decoder layers, %d Linear modules; calibration %d × %d tokens",
             source.name, len(layers), len(targets), *text.calibration.shape)
    return job


def evaluate_before(job: Job) -> list | None:
    """Perplexity of the original model, read from the evaluation cache for the windows it holds;
    returns this rank's top-k reference for the KL after (or None)."""
    from fabricq.eval_cache import reference_cache

    settings = job.config.eval
    if not settings.enabled:
        return None
    tick = time.perf_counter()
    cache = reference_cache(settings, job.identity["model"], job.text.evaluation, job.model.dtype, job.fabric.device)
    job.model.to(job.fabric.device)
    before = evaluate_sharded(job.fabric, job.model, job.text.evaluation, job.fabric.device, keep=settings.kl_windows,
                              desc="Perplexity before", stride=settings.stride, top_k=settings.kl_top_k, cache=cache)
    job.model.to("cpu")
    job.drop_weight_pages()
    job.report["ppl_before"] = before["ppl"]
    job.report["eval_tokens"] = before["tokens"]
    job.report["eval_convention"] = {**job.text.eval_convention, "tokens_scored": before["tokens"]}
    cached = before["cached_windows"] == before["windows"]
    job.report["eval"] = {"cached": cached, "windows_cached": before["cached_windows"], "windows": before["windows"],
                          "saved_s": before["saved_s"], "cache_dir": str(cache.path) if cache else None,
                          "kl_top_k": settings.kl_top_k, "kl_windows": min(settings.kl_windows, before["windows"])}
    job.timings["eval_before_s"] = time.perf_counter() - tick
    log.info("Perplexity before: %.3f (%d tokens%s)", before["ppl"], before["tokens"],
             f"; cached, {before['saved_s']:.1f} s saved" if cached else "")
    return before.pop("logprobs")


def calibrate_and_quantize(job: Job) -> tuple[GPTQCallback, ReleaseFinishedWeights]:
    """The API's layer loop with GPTQ on it (each rank its share of the windows), committing every
    layer to the work directory and continuing from the last committed one when resuming. Finished
    layers keep only their codes; a failure leaves the model to the resume directory, not restored."""
    calibrated = core.calibrate_and_quantize(
        job.model, job.text.calibration, job.config, job.settings, job.fabric, cache=job.cache, work=job.work,
        resuming=job.resuming, release_dense=True, restore_on_failure=False)
    job.report.update(calibrated.report)
    job.timings.update(calibrated.timings)
    return calibrated.gptq, calibrated.release


def evaluate_after(job: Job, gptq: GPTQCallback, release: ReleaseFinishedWeights, reference: list | None) -> None:
    """Perplexity and KL of the weights the checkpoint will hold."""
    from fabricq.checkpoint.save import round_unquantized

    if not job.config.eval.enabled:
        return
    tick = time.perf_counter()
    release.restore(job.model)
    round_unquantized(job.model, gptq.quantized, job.export_dtype)  # what the checkpoint holds
    job.model.to(job.fabric.device)
    after = evaluate_sharded(job.fabric, job.model, job.text.evaluation, job.fabric.device, reference=reference,
                             desc="Perplexity after", stride=job.config.eval.stride)
    job.model.to("cpu")
    job.report["ppl_after"] = after["ppl"]
    job.report["kl_after"] = after["kl"]  # top-k terms exact, the tail term estimated from drawn tokens
    job.report["kl_after_lower_bound"] = after.get("kl_lower_bound")  # the top-k ∪ {rest} KL alone
    job.timings["eval_after_s"] = time.perf_counter() - tick
    log.info("Perplexity after: %.3f · KL %.5f", after["ppl"], after["kl"])


def export(job: Job, gptq: GPTQCallback) -> dict:
    """Rank 0 writes the checkpoint(s), report.json and the resolved config, then publishes."""
    from fabricq.report_card import write_report_files
    from fabricq.checkpoint.save import save_checkpoints

    report = job.report
    if job.rank != 0:  # only rank 0 writes; the others wait for it at the final barrier
        runtime.finish(job.fabric)
        return report
    tick = time.perf_counter()
    staging = job.output.new_staging()
    report["export"] = {"formats": save_checkpoints(job.model, gptq.quantized, staging, job.tokenizer, job.config.export),
                        "dtype": str(job.export_dtype).removeprefix("torch.")}
    job.timings["export_s"] = time.perf_counter() - tick
    report.update(
        model=job.source.name,
        method=job.settings.method,
        # as solved: export.tp_aware turns a dynamic run into a folded one
        scheme={**OmegaConf.to_container(job.cfg.quant, resolve=True), "actorder": job.config.quant.actorder},
        calibration={
            "samples": int(job.text.calibration.shape[0]),
            "seq_len": int(job.text.calibration.shape[1]),
            # Fingerprint of the exact token windows, so other tools can be fed the same.
            "sha256": job.identity["data_sha256"],
            "convention": job.text.calibration_convention,  # bos, sampling, chat_template
        },
        wall_s=time.perf_counter() - job.start,
        peak_rss_mib=peak_rss_mib(),
        timings=job.timings,
        modules=gptq.stats,
    )
    write_report_files(staging, report, job.cfg, job.source)
    job.output.publish(staging)
    job.work.remove()
    runtime.finish(job.fabric)
    log.info("Wrote %s (%.1f s, peak RSS %.0f MiB)", job.output_dir, report["wall_s"], report["peak_rss_mib"])
    return report
