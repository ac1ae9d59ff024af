"""Perplexity and KL divergence of a causal LM on held-out token windows, in bounded memory.

Logits are made a few positions at a time from the decoder's output (`fabricq.recovery.teacher`),
so a whole window's logits over the vocabulary and their log-softmax never exist at once in
float32. The reference for the KL is kept compact: each position's top-k log-probs and the log of
the remaining mass (the recovery teacher's storage), plus `TAIL_SAMPLES` tokens drawn from the
reference's distribution over the rest. The KL of the two distributions coarsened to
top-k ∪ {rest} is a lower bound of the full KL (`kl_lower_bound`, exact when k covers the
vocabulary); by the chain rule the full KL exceeds it by p(rest)·KL(p(·|rest) ‖ q(·|rest)), an
expectation under p(·|rest) that the drawn tokens estimate without bias (`kl`). Draws are seeded by
window index and position, so a window's reference is the same in every run. `top_k=None` keeps
full rows (float16) instead, for callers that need them.

Each window's result (`WindowResult`) is self-contained, so a cache (`fabricq.eval_cache`) can hold
the original model's windows and ranks can read back only their own shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fabricq.parallel.plan import shard_batches
from fabricq.recovery.teacher import (
    final_hidden,
    head_is_plain,
    logit_chunks,
    student_rest,
    top_and_rest,
    topk_kl_from_logprobs,
)
from fabricq.sysmem import reusing_freed_blocks

# Part of every evaluation cache key: raise it when a change alters what a window's result holds.
EVALUATOR_VERSION = 1
# Positions per chunk of logits: 128 × a 49k vocabulary is 25 MiB of float32 per temporary.
POSITION_CHUNK = 128
# Tokens drawn per position from the reference's tail (beyond its top-k) for the KL's tail term.
TAIL_SAMPLES = 16


@dataclass
class WindowResult:
    """One window: Σ −log p(next token) over its scored positions (float64), how many there are,
    the kept KL reference of those positions (top-k (indices int32, log-probs, log rest mass) or
    float16 full rows), and the seconds it took to compute."""

    nll: float
    tokens: int
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor | None = None
    seconds: float = 0.0


def scored_positions(index: int, seq_len: int, stride: int | None) -> int:
    """How many of window `index`'s last next-token predictions count: all of them in the first
    window and in non-overlapping windows; with sliding windows (`stride`) only the `stride` new
    tokens, so every token of the text is scored exactly once (the usual sliding-window recipe)."""
    return seq_len - 1 if stride is None or index == 0 else min(stride, seq_len - 1)


def _logit_chunks(model, window: torch.Tensor, device, scored: int, plain: bool, chunk: int):
    """(start, logits (n, vocab)) over the last `scored` predicting positions of `window`."""
    ids = window[None].to(device)
    if plain:
        hidden = final_hidden(model, ids)[:, -scored - 1 : -1]
        for start, logits in logit_chunks(model, hidden, chunk):
            yield start, logits[0]
    else:  # logits the head alone does not make (soft-capping, scaling): the model's own, then chunks
        logits = model(input_ids=ids, use_cache=False).logits[0, -scored - 1 : -1]
        for start in range(0, scored, chunk):
            yield start, logits[start : start + chunk]


def compact_reference(logprobs: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(top-k ids int32, top-k log-probs, log rest mass[, tail ids int32, their log-probs]) of
    log-prob rows (n, vocab); the tail part is absent when k covers the vocabulary."""
    k = min(k, logprobs.shape[-1])
    top, idx, rest = top_and_rest(logprobs, k)
    parts = [idx.to(torch.int32), top, rest]
    if k < logprobs.shape[-1] and TAIL_SAMPLES:
        # p(·|rest), normalized by the rest mass itself: no underflow however small that mass is.
        # A row without rest mass (masked logits) draws anything: its tail term is weighted by 0.
        tail = (logprobs - torch.where(torch.isfinite(rest), rest, 0.0)[:, None]).exp().scatter(-1, idx, 0.0)
        tail[~(tail.sum(-1) > 0)] = 1.0
        generator = torch.Generator(device=logprobs.device).manual_seed(seed)
        drawn = torch.multinomial(tail, TAIL_SAMPLES, replacement=True, generator=generator)
        parts += [drawn.to(torch.int32), logprobs.gather(-1, drawn)]
    return tuple(t.cpu() for t in parts)


def _kl_chunk(reference, start: int, logprobs: torch.Tensor) -> tuple[float, float]:
    """Σ over this chunk's positions of KL(reference ‖ model): (estimate, lower bound); the two
    are the same for full rows."""
    end = start + logprobs.shape[0]
    if isinstance(reference, tuple):
        parts = [t[start:end].to(logprobs.device) for t in reference]
        indices, ref_top, ref_rest = parts[0].long(), parts[1].float(), parts[2].float()
        model_rest = student_rest(logprobs, indices)  # shared by the coarse KL and the tail term
        coarse = float(topk_kl_from_logprobs(logprobs, indices, ref_top, ref_rest, model_rest))
        if len(parts) == 3:
            return coarse, coarse
        drawn, ref_drawn = parts[3].long(), parts[4].float()
        ratio = (ref_drawn - ref_rest[:, None]) - (logprobs.gather(-1, drawn) - model_rest[:, None])
        tail = torch.where(torch.isfinite(ref_rest), ref_rest.exp() * ratio.mean(-1), 0.0)
        return coarse + float(tail.sum(dtype=torch.float64)), coarse
    ref = reference[start:end].to(logprobs.device).float()
    full = float((ref.exp() * (ref - logprobs)).sum(dtype=torch.float64))
    return full, full


@torch.no_grad()
def evaluate_window(model, window: torch.Tensor, device, scored: int, *, keep: bool = False, top_k: int | None = None,
                    reference=None, plain: bool = True, chunk: int = POSITION_CHUNK,
                    seed: int = 0) -> tuple[WindowResult, tuple[float, float]]:
    """One window's result (with its reference kept when `keep`; tail draws seeded from `seed`)
    and Σ KL(reference ‖ model) over its scored positions as (estimate, lower bound)."""
    tick = time.perf_counter()
    targets = window[-scored:].to(device)
    nll, kl, kl_lower, kept = 0.0, 0.0, 0.0, []
    for start, logits in _logit_chunks(model, window, device, scored, plain, chunk):
        logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        part = targets[start : start + logprobs.shape[0]]
        nll -= float(logprobs.gather(1, part[:, None]).sum(dtype=torch.float64))
        if keep:
            if top_k is None:
                kept.append(logprobs.to(torch.float16).cpu())
            else:
                kept.append(compact_reference(logprobs, top_k, seed * 1_000_003 + start))
        if reference is not None:
            estimate, lower = _kl_chunk(reference, start, logprobs)
            kl, kl_lower = kl + estimate, kl_lower + lower
        del logits, logprobs
    kept_reference = None
    if keep:
        kept_reference = torch.cat(kept) if top_k is None else tuple(torch.cat(parts) for parts in zip(*kept))
    return WindowResult(nll, scored, kept_reference, time.perf_counter() - tick), (kl, kl_lower)


@torch.no_grad()
def evaluate(
    model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None, desc: str | None = None,
    stride: int | None = None, first_index: int = 0, top_k: int | None = None, cache=None,
) -> dict:
    """Perplexity over the scored positions of all windows (`scored_positions`; `first_index`: the
    index of `windows[0]` among all windows); optionally keep the first `keep` windows' reference
    (top-k with `top_k`, else float16 full rows) and/or the mean KL(reference ‖ model) over the
    reference windows' scored positions. `cache` (`fabricq.eval_cache.ReferenceCache`): windows it
    holds are read from it, the others computed and stored. With `desc`, a progress bar."""
    nll, tokens, kept, kl_sum, kl_lower, kl_tokens = 0.0, 0, [], 0.0, 0.0, 0
    hits, saved, plain = 0, 0.0, None
    with reusing_freed_blocks():  # every window's temporaries have the same sizes: reuse them
        bar = tqdm(windows, desc=desc, unit="window", disable=desc is None, mininterval=5)
        for i, window in enumerate(bar):
            index, scored = first_index + i, scored_positions(first_index + i, len(window), stride)
            tick = time.perf_counter()
            compare = reference is not None and i < len(reference)  # a KL needs this model's forward
            result = cache.load(index) if cache is not None and not compare else None
            if result is not None and (result.tokens != scored or (i < keep and result.reference is None)):
                result = None  # not what this evaluation needs: computed again
            window_kl = (0.0, 0.0)
            if result is not None:
                hits += 1
                saved += result.seconds - (time.perf_counter() - tick)
            else:
                if plain is None:  # once per call, on a short prefix: cheap next to a window
                    plain = head_is_plain(model, window[None, : min(len(window), 16)].to(device))
                result, window_kl = evaluate_window(model, window, device, scored, keep=i < keep, top_k=top_k,
                                                    reference=reference[i] if compare else None, plain=plain,
                                                    seed=index)
                if cache is not None:
                    cache.store(index, result)
            nll += result.nll
            tokens += result.tokens
            if i < keep:
                kept.append(result.reference)
            if compare:
                kl_sum, kl_lower = kl_sum + window_kl[0], kl_lower + window_kl[1]
                kl_tokens += scored
    out = {"ppl": math.exp(nll / tokens), "nll": nll, "tokens": tokens, "logprobs": kept,
           "windows": len(windows), "cached_windows": hits, "saved_s": max(0.0, saved)}
    if reference is not None:
        out["kl"] = kl_sum / kl_tokens if kl_tokens else float("nan")
        out["kl_lower_bound"] = kl_lower / kl_tokens if kl_tokens else float("nan")
        out["kl_tokens"] = kl_tokens
    return out


def evaluate_sharded(fabric, model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None,
                     desc: str | None = None, stride: int | None = None, top_k: int | None = None,
                     cache=None) -> dict:
    """`fabricq.evaluate.evaluate` with the windows split over ranks (contiguous shards) and the
    sums combined: the same perplexity and KL as one rank up to float rounding. The references
    kept for the KL stay on the rank that computed them (`reference` is that rank's list); each
    rank reads and writes only its shard's windows in `cache`. Only rank 0 shows the progress bar."""
    progress = {"desc": desc} if desc else {}
    options = {"stride": stride, "top_k": top_k, "cache": cache}
    if fabric.world_size == 1:
        return evaluate(model, windows, device, keep=keep, reference=reference, **options, **progress)
    shard = shard_batches(len(windows), fabric.world_size)[fabric.global_rank]
    local = windows[shard.start : shard.stop]
    local_keep = max(0, min(keep, shard.stop) - shard.start)
    totals = torch.zeros(7, dtype=torch.float64)
    saved = torch.zeros(1, dtype=torch.float64)
    kept: list = []
    if len(local):
        result = evaluate(model, local, device, keep=local_keep, reference=reference or None, first_index=shard.start,
                          **options, **(progress if fabric.global_rank == 0 else {}))
        kept = result["logprobs"]
        totals[:2] = torch.tensor([result["nll"], result["tokens"]], dtype=torch.float64)
        if reference and result["kl_tokens"]:
            totals[2] = result["kl"] * result["kl_tokens"]
            totals[3] = result["kl_tokens"]
            totals[6] = result["kl_lower_bound"] * result["kl_tokens"]
        totals[4:6] = torch.tensor([result["cached_windows"], result["windows"]], dtype=torch.float64)
        saved[0] = result["saved_s"]
    totals, saved = totals.to(fabric.device), saved.to(fabric.device)
    torch.distributed.all_reduce(totals)
    torch.distributed.all_reduce(saved, op=torch.distributed.ReduceOp.MAX)  # ranks run side by side
    totals = totals.cpu()
    out = {"ppl": math.exp(totals[0] / totals[1]), "nll": float(totals[0]), "tokens": int(totals[1]), "logprobs": kept,
           "cached_windows": int(totals[4]), "windows": int(totals[5]), "saved_s": float(saved.cpu()[0])}
    if reference is not None:
        out["kl"] = float(totals[2] / totals[3]) if totals[3] else float("nan")
        out["kl_lower_bound"] = float(totals[6] / totals[3]) if totals[3] else float("nan")
    return out


def reference_tensors(reference: list) -> dict[str, torch.Tensor]:
    """A rank's kept references as named tensors (for safetensors), top-k or full rows."""
    out = {}
    for i, ref in enumerate(reference):
        for j, t in enumerate(ref if isinstance(ref, tuple) else (ref,)):
            out[f"{i}.{j}"] = t.contiguous()
    return out


def reference_from_tensors(tensors: dict[str, torch.Tensor]) -> list:
    """The inverse of `reference_tensors`."""
    windows = sorted({int(name.split(".")[0]) for name in tensors})
    out = []
    for i in windows:
        parts = [tensors[f"{i}.{j}"] for j in range(5) if f"{i}.{j}" in tensors]
        out.append(tuple(parts) if len(parts) > 1 else parts[0])
    return out
