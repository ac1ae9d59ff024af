"""`GPTQ`: fabricq's quantization as a `lightning.pytorch` callback (`from fabricq.callbacks import GPTQ`).

At the end of fit (or of training) the LightningModule's causal LM is quantized in place — the same
layer loop, GPTQ and rank logic as the command line (`fabricq.core`) — on windows cut from the
trainer's train dataloader. Under DDP each rank calibrates its own batches (the dataloader's
DistributedSampler gives each its own) and the Hessians are reduced over the Trainer's process
group, so every rank ends with the same weights.
"""

from __future__ import annotations

import logging
import re
import time

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from fabricq.api import (
    QuantizeResult,
    causal_lm,
    compose_config,
    ids_and_mask,
    quantize_windows,
)
from fabricq.core import agree
from fabricq.errors import FabricqError
from fabricq.models import decoder_layers, layer_prefix
from fabricq.parallel.plan import shard_batches

log = logging.getLogger("fabricq")

WHEN = ("fit_end", "train_end")


class StrategyRanks:
    """What fabricq uses of a Fabric, from a Trainer's strategy (its process group is the default
    one, which fabricq's collectives use)."""

    def __init__(self, strategy):
        self.strategy = strategy

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def device(self) -> torch.device:
        return self.strategy.root_device

    def barrier(self) -> None:
        self.strategy.barrier("fabricq")

    def broadcast(self, obj, src: int = 0):
        return self.strategy.broadcast(obj, src)


def windows_from_batches(batches, count: int, seq_len: int, where: str = "the calibration dataloader") -> torch.Tensor:
    """`count` windows of `seq_len` tokens: the batches' rows, without their padding (attention_mask
    0), packed into one stream in order and cut. Reads only as many batches as that needs."""
    need, stream, total = count * seq_len, [], 0
    for b, batch in enumerate(batches):
        ids, mask = ids_and_mask(batch, f"{where}'s batch {b}")
        for r, row in enumerate(ids):
            tokens = row if mask is None else row[mask[r].bool()]
            stream.append(tokens)
            total += len(tokens)
        if total >= need:
            return torch.cat(stream)[:need].view(count, seq_len)
    raise FabricqError(f"{where} gave {total} tokens, fewer than num_samples × seq_len = {count} × {seq_len} = "
                       f"{need}: lower num_samples or seq_len, or give more data")


class GPTQ(Callback):
    """Quantize the LightningModule's causal LM at the end of fit (`when="fit_end"`) or training
    (`"train_end"`): its Linear weights are replaced in place by their dequantized values, so
    validate/test/predict see the quantized model.

    `recipe`: a name in conf/recipe; `num_samples` windows of `seq_len` tokens in all (over every
    rank) from the trainer's train dataloader, or from `dataloader` (batches: a tensor of token
    ids, a dict with input_ids and attention_mask, or an (inputs, ...) tuple of those);
    `output_dir`: where rank 0 writes the checkpoint + report.json (None: nothing is written);
    `model_attr`: the attribute holding the causal LM (default: the module itself if it has
    decoder layers, else `.model`); `overrides`: the command line's `group.field=value` strings;
    `tokenizer`: saved beside the checkpoint. Bad arguments raise `FabricqError` here, at
    construction; bad data before any layer changes, on every rank. The per-layer GPTQ losses,
    the wall time and the report go to the trainer's loggers (`gptq/...`); `result` holds the
    `QuantizeResult` afterwards."""

    def __init__(self, recipe: str = "gptq_w4", num_samples: int = 128, seq_len: int = 512, output_dir=None,
                 when: str = "fit_end", model_attr: str | None = None, overrides=(), dataloader=None,
                 tokenizer=None):
        for name, value in (("num_samples", num_samples), ("seq_len", seq_len)):
            if type(value) is not int or value < 1:
                raise FabricqError(f"GPTQ {name} must be a positive integer, got {value!r}")
        if when not in WHEN:
            raise FabricqError(f"GPTQ when must be one of {WHEN}, got {when!r}")
        if model_attr is not None and (type(model_attr) is not str or not model_attr):
            raise FabricqError(f"GPTQ model_attr must be an attribute name, got {model_attr!r}")
        if isinstance(overrides, str):
            raise FabricqError(f"GPTQ overrides must be a list of group.field=value strings, got {overrides!r}")
        self.cfg, self.config = compose_config(
            recipe, [*overrides, f"data.num_samples={num_samples}", f"data.seq_len={seq_len}"])
        self.num_samples, self.seq_len = num_samples, seq_len
        self.output_dir, self.when, self.model_attr = output_dir, when, model_attr
        self.dataloader, self.tokenizer = dataloader, tokenizer
        self.result: QuantizeResult | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.when == "train_end":
            self.quantize(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.when == "fit_end":
            self.quantize(trainer, pl_module)

    def causal_lm_of(self, pl_module: nn.Module) -> nn.Module:
        name = type(pl_module).__name__
        if self.model_attr is not None:
            if not hasattr(pl_module, self.model_attr):
                raise FabricqError(f"GPTQ model_attr={self.model_attr!r}: the {name} has no such attribute")
            return causal_lm(getattr(pl_module, self.model_attr), f"{name}.{self.model_attr}")
        try:
            decoder_layers(pl_module)
            return causal_lm(pl_module, name)
        except FabricqError:
            pass
        if not isinstance(getattr(pl_module, "model", None), nn.Module):
            raise FabricqError(f"the {name} has no decoder layers and no .model holding a causal LM: pass "
                               "GPTQ(model_attr=...) naming the attribute that holds it")
        return causal_lm(pl_module.model, f"{name}.model")

    def quantize(self, trainer, pl_module) -> QuantizeResult:
        start = time.perf_counter()
        ranks = StrategyRanks(trainer.strategy)
        problem, model, windows = None, None, None
        try:  # every check before any layer changes, and every rank learns of any rank's problem
            model = self.causal_lm_of(pl_module)
            loader = self.dataloader if self.dataloader is not None else trainer.train_dataloader
            if loader is None:
                raise FabricqError("the trainer has no train dataloader: pass GPTQ(dataloader=...)")
            count = len(shard_batches(self.num_samples, ranks.world_size)[ranks.global_rank])
            if count == 0:
                raise FabricqError(f"num_samples={self.num_samples} windows for {ranks.world_size} ranks: every "
                                   "rank needs at least one")
            windows = windows_from_batches(loader, count, self.seq_len)
        except FabricqError as err:
            problem = str(err)
        agree(ranks, problem)
        result = quantize_windows(model, windows, None, self.cfg, self.config, ranks, shard=False, start=start)
        if self.output_dir is not None:
            result.save(self.output_dir, tokenizer=self.tokenizer)
        self._log(trainer, model, result)
        self.result = result
        return result

    @staticmethod
    def _log(trainer, model: nn.Module, result: QuantizeResult) -> None:
        """Per-layer GPTQ loss (summed over its modules) and the wall time, to every logger."""
        prefix = re.escape(layer_prefix(model, decoder_layers(model)))
        metrics: dict[str, float] = {}
        for name, stats in result.stats.items():
            layer = re.match(rf"{prefix}\.(\d+)\.", name)
            if layer and stats.get("loss") is not None:
                key = f"gptq/loss_layer_{layer.group(1)}"
                metrics[key] = metrics.get(key, 0.0) + float(stats["loss"])
        metrics["gptq/wall_s"] = float(result.report["wall_s"])
        for key in ("ppl_before", "ppl_after", "kl_after"):
            if key in result.report:
                metrics[f"gptq/{key}"] = float(result.report[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("GPTQ: %d modules quantized in %.1f s", len(result.quantized), result.report["wall_s"])
