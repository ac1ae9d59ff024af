"""How a recovery measures: the original model's reference (reused from the run where it can be),
the base's numbers from the run's own report, the served model prepared for evaluation, the gap
closed, and sums over ranks."""

from __future__ import annotations

import itertools
import mmap
from pathlib import Path

import torch

from fabricq.evaluate import evaluate, evaluate_sharded
from fabricq.parallel.plan import shard_batches
from fabricq.sysmem import drop_mapped_pages


def rank_reducer(fabric):
    """Sum a tensor and a token count over the ranks (to all, or to `dst` only); None on one rank."""
    if fabric.world_size == 1:
        return None

    def reduce(total: torch.Tensor, tokens: int, dst: int | None = None):
        # With dst, summed on that rank only: None elsewhere (gloo leaves partial sums there).
        total = total.to(fabric.device)
        count = torch.tensor([float(tokens)], dtype=torch.float64, device=fabric.device)
        for t in (total, count):
            if dst is None:
                torch.distributed.all_reduce(t)
            else:
                torch.distributed.reduce(t, dst)
        if dst is not None and fabric.global_rank != dst:
            return None
        return total.cpu(), int(count.item())

    return reduce


def original_reference(fabric, model, text, ev, report: dict, cache) -> tuple[dict, list]:
    """The original model's perplexity on the evaluation windows and its top-k reference on the
    first eval.kl_windows of them (this rank's share). The run measured the perplexity on the very
    same windows when its report says they were made the same way; then only the KL windows are
    needed, and `cache` (the run's evaluation cache entry) usually holds them: the original model
    runs only on the windows it lacks. `ev`: the checked eval settings."""
    stride, top_k = ev.stride, ev.kl_top_k
    convention = report.get("eval_convention") or {}
    same = text.eval_convention and all(convention.get(k) == v for k, v in text.eval_convention.items())
    if report.get("ppl_before") is None or not same:
        before = evaluate_sharded(fabric, model, text.evaluation, fabric.device, keep=ev.kl_windows,
                                  desc="Perplexity before", stride=stride, top_k=top_k, cache=cache)
        return before, before.pop("logprobs")
    shard = shard_batches(len(text.evaluation), fabric.world_size)[fabric.global_rank]
    stop = min(shard.stop, ev.kl_windows)
    kept, cached = [], 0
    if stop > shard.start:
        result = evaluate(model, text.evaluation[shard.start : stop], fabric.device, keep=stop - shard.start,
                          stride=stride, first_index=shard.start, top_k=top_k, cache=cache)
        kept, cached = result["logprobs"], result["cached_windows"]
    return {"ppl": report["ppl_before"], "cached_windows": cached}, kept


def run_base_result(report: dict, cache) -> dict | None:
    """The run's own ppl_after/kl_after when it evaluated these very windows against the same
    reference (the same evaluation-cache entry: model, windows, stride, KL settings, dtype) — it
    measured them on exactly the weights the checkpoint holds, so the base need not be evaluated
    again. None otherwise (another evaluation setting, or no cache to prove the windows equal)."""
    run_eval = report.get("eval") or {}
    if cache is None or report.get("ppl_after") is None or report.get("kl_after") is None or not run_eval.get("cache_dir"):
        return None
    if Path(run_eval["cache_dir"]).name != cache.path.name:  # the entry's name is its key's digest
        return None
    return {"ppl": report["ppl_after"], "kl": report["kl_after"]}


def for_evaluation(served, device):
    """A model loaded from a compressed checkpoint, on `device`: transformers keeps the packed
    tensors, memory-mapped from the checkpoint, beside their decompressed copies, and the
    evaluation reads only the copies, so their pages leave resident memory (clean file pages:
    re-read if anything touches them). Tensors smaller than a page (compressed-tensors'
    `weight_shape`, two integers per module) cannot give up a page, yet as views into the mapping
    they keep all of it, and every page the loading read (the whole checkpoint), resident: they
    are copied out, and the mapping goes with its last view."""
    tensors = list(itertools.chain(served.parameters(), served.buffers()))
    drop_mapped_pages(tensors, keep_written=True)
    with torch.no_grad():
        for tensor in tensors:
            if tensor.numel() * tensor.element_size() < mmap.PAGESIZE:
                tensor.data = tensor.data.clone()
    del tensors
    return served.to(device)


def gap_closed(before, after, recovered):
    """The fraction of the quantization gap (after − before) that recovery closed; None when unknown."""
    if None in (before, after, recovered) or after == before:
        return None
    return (after - recovered) / (after - before)
