"""fabricq as a library: `quantize(model, calibration_ids, recipe=..., overrides=[...], fabric=...)`.

The config is composed from `fabricq.conf` with the command line's `group.field=value` overrides
and checked by `fabricq.config.load_settings`, so a bad value gives the same `FabricqError`; the
calibration is `fabricq.core`'s, the one the command line runs; `QuantizeResult.save` writes
with the command line's writer under the same output-directory rules (`fabricq.output`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from fabricq.calibration.cache import ActivationCache, cache_from_config
from fabricq.config import Settings, load_settings, recipe_spelling
from fabricq.core import (
    OneProcess,
    agree,
    calibrate_and_quantize,
    gptq_settings,
    plan_model,
)
from fabricq.errors import FabricqError
from fabricq.sysmem import peak_rss_mib
from fabricq.models import decoder_layers
from fabricq.resume import data_identity

log = logging.getLogger("fabricq")

# ---------------------------------------------------------------------------------------------
# Config: conf/ + overrides, as the command line composes it
# ---------------------------------------------------------------------------------------------


def compose_config(recipe: str, overrides=()) -> tuple[DictConfig, Settings]:
    """The config `python -m fabricq recipe=RECIPE OVERRIDES` runs with, and its checked settings."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fabricq.__main__ import check_one_scheme, hydra_error_line

    if type(recipe) is not str or not recipe:
        raise FabricqError(f"recipe must be the name of a recipe (conf/recipe), got {recipe!r}")
    if isinstance(overrides, str) or not all(type(o) is str for o in overrides):
        raise FabricqError(f"overrides must be a list of group.field=value strings, got {overrides!r}")
    try:
        with initialize_config_module("fabricq.conf", version_base=None):
            cfg = compose("config", overrides=[f"recipe={recipe}", *map(recipe_spelling, overrides)],
                          return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise FabricqError(hydra_error_line(err)) from None
    check_one_scheme(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, load_settings(cfg)


# ---------------------------------------------------------------------------------------------
# Inputs: token windows, the model
# ---------------------------------------------------------------------------------------------


def ids_and_mask(item, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, mask or None) of a tensor of token ids or a dict with input_ids (+attention_mask)."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (torch.Tensor, dict)):
        item = item[0]  # (inputs, labels) batches
    mask = None
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise FabricqError(f"{where} is a dict without input_ids (keys: {', '.join(map(str, item))})")
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        ids = item
    if (not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool
            or ids.dim() not in (1, 2)):
        what = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise FabricqError(f"{where} is {what}: GPTQ needs token ids, a (batch, tokens) integer tensor or a "
                           "dict with input_ids (and attention_mask)")
    ids = ids.reshape(-1, ids.shape[-1]).cpu().long()
    if mask is not None:
        mask = torch.as_tensor(mask).cpu()
        if mask.numel() != ids.numel():
            raise FabricqError(f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        mask = mask.reshape(ids.shape).long()
    return ids, mask


def calibration_windows(calibration_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(windows (N, T), attention mask (N, T) or None when nothing is padded) from a tensor of ids,
    a dict with input_ids (+attention_mask), or a list of either of the same width T."""
    items = calibration_ids if isinstance(calibration_ids, (list, tuple)) else [calibration_ids]
    if not items:
        raise FabricqError("calibration_ids is empty")
    parts = [ids_and_mask(item, f"calibration_ids[{i}]" if len(items) > 1 else "calibration_ids")
             for i, item in enumerate(items)]
    widths = {ids.shape[1] for ids, _ in parts}
    if len(widths) > 1:
        raise FabricqError(f"calibration_ids have different widths {sorted(widths)}: pad them to one width "
                           "(with an attention_mask) or cut them into windows of one length")
    ids = torch.cat([p[0] for p in parts])
    if ids.numel() == 0:
        raise FabricqError("calibration_ids hold no tokens")
    mask = torch.cat([m if m is not None else torch.ones_like(i) for i, m in parts])
    if not mask.any(dim=1).all():
        raise FabricqError("calibration_ids: some windows are padding only (attention_mask all 0)")
    return ids, (None if mask.all() else mask)


def causal_lm(module: nn.Module, what: str = "the model") -> nn.Module:
    """`module` if fabricq can quantize it (decoder layers holding Linear modules), else FabricqError."""
    if isinstance(module, (str, os.PathLike)):
        path = Path(module).expanduser()
        where = ("a path that does not exist" if not path.exists() else
                 "a folder: load it first" if path.is_dir() else "a file: load its model first")
        raise FabricqError(f"{what} is the path {str(module)!r} ({where}): fabricq.quantize wants a loaded model, "
                           "as AutoModelForCausalLM.from_pretrained(path) returns (or the command line: "
                           "python -m fabricq model.path=PATH)")
    if not isinstance(module, nn.Module):
        raise FabricqError(f"{what} is of type {type(module).__name__}: fabricq.quantize wants a loaded model (a torch "
                           "nn.Module, as AutoModelForCausalLM.from_pretrained(path) returns)")
    if type(module).__name__ == "_FabricModule":  # fabric.setup(model): its original module
        from lightning.fabric.wrappers import _unwrap_objects

        module = _unwrap_objects(module)
    try:
        layers = decoder_layers(module)
    except FabricqError as err:
        raise FabricqError(f"{what} ({type(module).__name__}) has no decoder layers: {err}") from None
    if not any(isinstance(m, nn.Linear) for m in layers.modules()):
        raise FabricqError(f"{what} ({type(module).__name__}) has no Linear layers in its decoder layers: nothing to quantize")
    if any(p.is_meta for p in module.parameters()):
        raise FabricqError(f"{what} has weights on the meta device (built without loading them): load it with "
                           "from_pretrained")
    return module


# ---------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    """The quantized model (its Linear weights hold their dequantized values), the packed results
    by module, and `report`: what report.json holds, but for the files `save` writes."""

    model: nn.Module
    quantized: dict
    report: dict
    cfg: DictConfig
    config: Settings
    ranks: object
    export_dtype: torch.dtype

    @property
    def stats(self) -> dict:
        return self.report["modules"]

    def save(self, output_dir, tokenizer=None, overwrite: bool | None = None) -> Path:
        """Write the checkpoint(s) of `export.format`, report.json and the resolved config into
        `output_dir` (rank 0; every rank returns once it is written). A non-empty `output_dir` is
        refused unless `overwrite` (default: the config's `overwrite`); it appears complete or not
        at all."""
        from fabricq.output import OutputClaim, check_inputs_outside, check_output_dir
        from fabricq.report_card import write_report_files
        from fabricq.checkpoint.save import save_checkpoints

        output_dir = Path(output_dir)
        overwrite = self.config.overwrite if overwrite is None else overwrite
        if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
            raise FabricqError(f"tokenizer is of type {type(tokenizer).__name__}: pass a Hugging Face tokenizer "
                               "(with save_pretrained) or None")
        check_inputs_outside(output_dir, {"the folder the model was loaded from": model_folder(self.model)})
        check_output_dir(output_dir, overwrite)
        if self.ranks.global_rank == 0:
            claim = OutputClaim(output_dir, overwrite, writer=True)
            claim.acquire()
            failed = True
            try:
                staging = claim.new_staging()
                report = dict(self.report)
                report["export"] = {"formats": save_checkpoints(self.model, self.quantized, staging, tokenizer,
                                                                self.config.export),
                                    "dtype": str(self.export_dtype).removeprefix("torch.")}
                write_report_files(staging, report, self.cfg)
                claim.publish(staging)
                failed = False
            finally:
                claim.release(failed=failed)
        if self.ranks.world_size > 1:
            self.ranks.barrier()
        return output_dir


def model_folder(model: nn.Module) -> Path | None:
    """The local folder a Hugging Face model was loaded from (its name_or_path), if it is one: the
    input `QuantizeResult.save` may not write over."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    folder = Path(name).expanduser()
    return folder if folder.is_dir() else None


def check_token_ids(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Every token id must index the model's input embeddings (else the first forward fails deep in
    torch with "index out of range in self")."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int) or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise FabricqError(f"{what} hold token id {low if low < 0 else high}, outside the model's vocabulary of {vocab} "
                           f"(0 to {vocab - 1}): tokenize with the model's own tokenizer")


def calibration_report(windows: torch.Tensor, ranks, shard: bool) -> dict:
    """Samples, length and sha256 of every rank's windows together (in rank order)."""
    if not shard and ranks.world_size > 1:
        parts = [None] * ranks.world_size
        torch.distributed.all_gather_object(parts, windows.cpu())
        windows = torch.cat(parts)
    return {"samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "sha256": data_identity(windows)}


def quantize(model: nn.Module, calibration_ids, recipe: str = "gptq_w4", overrides=(), fabric=None, eval_ids=None,
             *, shard: bool = True) -> QuantizeResult:
    """Quantize `model` (a Hugging Face causal LM, or anything with decoder layers) in place.

    `calibration_ids`: token windows, a (N, T) integer tensor, a dict with input_ids (and
    attention_mask: padded positions are left out of the Hessians), or a list of them. `recipe`
    and `overrides`: as on the command line (`quant.bits=3`, `data.batch_size=4`, ...). `fabric`:
    a launched Fabric whose ranks share the work (None: this process alone); with `shard`, every
    rank passes the same windows and calibrates its share of them, otherwise each passes its own.
    `eval_ids`: windows for perplexity before and after (and the KL) in the report."""
    start = time.perf_counter()
    cfg, config = compose_config(recipe, overrides)
    windows, mask = calibration_windows(calibration_ids)
    model = causal_lm(model)
    ranks = fabric if fabric is not None else OneProcess(next(model.parameters()).device)
    return quantize_windows(model, windows, mask, cfg, config, ranks, shard=shard, eval_ids=eval_ids, start=start)


def quantize_windows(model: nn.Module, windows: torch.Tensor, mask: torch.Tensor | None, cfg: DictConfig,
                     config: Settings, ranks, *, shard: bool, eval_ids=None, start: float | None = None) -> QuantizeResult:
    """`quantize` once the config is composed and the windows read (`calibration_windows`)."""
    start = time.perf_counter() if start is None else start
    settings = gptq_settings(config)
    if eval_ids is not None:
        eval_ids, eval_mask = calibration_windows(eval_ids)
        if eval_mask is not None:
            raise FabricqError("eval_ids must be unpadded token windows (no attention_mask zeros)")
        check_token_ids(model, eval_ids, "eval_ids")
        if eval_ids.shape[1] < 2:
            raise FabricqError(f"eval_ids are windows of {eval_ids.shape[1]} token: perplexity needs at least 2 per "
                               "window (a token and the one it predicts)")
    check_token_ids(model, windows, "calibration_ids")
    batches = -(-len(windows) // config.data.batch_size)
    problem = None
    if shard and batches < ranks.world_size:
        problem = (f"{ranks.world_size} ranks but only {batches} calibration batches of data.batch_size="
                   f"{config.data.batch_size}: every rank needs at least one")
    agree(ranks, problem)
    targets, export_dtype = plan_model(model, config, settings)
    report: dict = {}
    timings: dict = {}
    reference = None
    if eval_ids is not None:
        reference = _evaluate(ranks, model, eval_ids, config, report, timings, "before")
    with _spill_scratch(config, ranks) as cache:
        calibrated = calibrate_and_quantize(model, windows, config, settings, ranks, attention_mask=mask, shard=shard,
                                            cache=cache)
    timings.update(calibrated.timings)
    if eval_ids is not None:
        _evaluate(ranks, model, eval_ids, config, report, timings, "after", reference)
    gptq = calibrated.gptq
    report.update(calibrated.report)
    report.update(method=settings.method, scheme=OmegaConf.to_container(cfg.quant, resolve=True),
                  calibration=calibration_report(windows, ranks, shard), wall_s=time.perf_counter() - start,
                  peak_rss_mib=peak_rss_mib(), timings=timings, modules=gptq.stats)
    log.info("Quantized %d Linear modules of %d in %.1f s", len(gptq.quantized), len(targets), report["wall_s"])
    return QuantizeResult(model, gptq.quantized, report, cfg, config, ranks, export_dtype)


def _evaluate(ranks, model, windows, config: Settings, report: dict, timings: dict, when: str, reference=None):
    from fabricq.evaluate import evaluate_sharded

    tick = time.perf_counter()
    training = model.training
    model.eval()
    try:
        result = evaluate_sharded(ranks, model, windows, ranks.device, keep=config.eval.kl_windows if when == "before" else 0,
                                  reference=reference, desc=f"Perplexity {when}", stride=config.eval.stride,
                                  top_k=config.eval.kl_top_k)  # the compact reference, as the command line keeps
    finally:
        model.train(training)
    report[f"ppl_{when}"] = result["ppl"]
    report["eval_tokens"] = result["tokens"]
    if reference is not None:
        report["kl_after"] = result["kl"]
        report["kl_after_lower_bound"] = result["kl_lower_bound"]
    timings[f"eval_{when}_s"] = time.perf_counter() - tick
    return result.pop("logprobs")


class _spill_scratch:
    """The activation cache of an API run: unlimited memory, or within cache.* budgets with a
    scratch spill directory (removed afterwards) when none is configured."""

    def __init__(self, config: Settings, ranks):
        self.config, self.ranks, self.scratch = config, ranks, None

    def __enter__(self) -> ActivationCache | None:
        cache = self.config.cache
        if cache.device_mib is None and cache.host_mib is None:
            return None
        self.scratch = tempfile.TemporaryDirectory(prefix="fabricq-api-")
        path = Path(self.scratch.name)
        work = SimpleNamespace(path=path, spill_dir=path / "spill", rank=self.ranks.global_rank)
        return cache_from_config(self.config, {}, work, self.ranks.device)

    def __exit__(self, *exc) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
