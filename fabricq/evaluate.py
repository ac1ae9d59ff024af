"""Perplexity and KL divergence of a causal LM on held-out token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fabricq.parallel.plan import shard_batches


@torch.no_grad()
def next_token_logprobs(model, window: torch.Tensor, device) -> torch.Tensor:
    """log p(token t+1 | tokens ≤ t) over the vocabulary: (seq_len - 1, vocab) float32."""
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _kl_sum(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, rows: int = 256) -> float:
    """Σ over positions of KL(ref ‖ model), a few rows at a time: full-vocabulary temporaries for
    a 2048-token window would cost gigabytes."""
    total = 0.0
    for ref, cur in zip(ref_logprobs.split(rows), logprobs.split(rows)):
        ref = ref.float()
        total += float((ref.exp() * (ref - cur)).sum())
    return total


def scored_positions(index: int, seq_len: int, stride: int | None) -> int:
    """How many of window `index`'s last next-token predictions count: all of them in the first
    window and in non-overlapping windows; with sliding windows (`stride`) only the `stride` new
    tokens, so every token of the text is scored exactly once (the usual sliding-window recipe)."""
    return seq_len - 1 if stride is None or index == 0 else min(stride, seq_len - 1)


@torch.no_grad()
def evaluate(
    model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None, desc: str | None = None,
    stride: int | None = None, first_index: int = 0,
) -> dict:
    """Perplexity over the scored positions of all windows (`scored_positions`; `first_index`: the
    index of `windows[0]` among all windows); optionally keep the first `keep` windows' scored
    log-probs (float16, to compare against later) and/or the mean KL(reference ‖ model) over the
    reference windows' scored positions. With `desc`, a progress bar with an ETA."""
    nll, tokens, kept, kl_sum, kl_tokens = 0.0, 0, [], 0.0, 0
    bar = tqdm(windows, desc=desc, unit="window", disable=desc is None, mininterval=5)
    for i, window in enumerate(bar):
        scored = scored_positions(first_index + i, len(window), stride)
        logprobs = next_token_logprobs(model, window, device)[-scored:]
        targets = window[-scored:].to(logprobs.device)
        nll += float(-logprobs.gather(1, targets[:, None]).sum())
        tokens += scored
        if i < keep:
            kept.append(logprobs.to(torch.float16).cpu())
        if reference is not None and i < len(reference):
            kl_sum += _kl_sum(reference[i].to(logprobs.device), logprobs)
            kl_tokens += scored
    result = {"ppl": math.exp(nll / tokens), "tokens": tokens, "logprobs": kept}
    if reference is not None:
        result["kl"] = kl_sum / kl_tokens if kl_tokens else float("nan")
        result["kl_tokens"] = kl_tokens
    return result


def evaluate_sharded(fabric, model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None,
                     desc: str | None = None, stride: int | None = None) -> dict:
    """`fabricq.evaluate.evaluate` with the windows split over ranks (contiguous shards) and the
    sums combined: the same perplexity and KL as one rank up to float rounding. The log-probs
    kept for the KL stay on the rank that computed them (`reference` is that rank's list).
    Only rank 0 shows the progress bar (`desc`)."""
    progress = {"desc": desc} if desc else {}
    if fabric.world_size == 1:
        return evaluate(model, windows, device, keep=keep, reference=reference, stride=stride, **progress)
    shard = shard_batches(len(windows), fabric.world_size)[fabric.global_rank]
    local = windows[shard.start : shard.stop]
    local_keep = max(0, min(keep, shard.stop) - shard.start)
    totals = torch.zeros(4, dtype=torch.float64)
    kept: list = []
    if len(local):
        result = evaluate(model, local, device, keep=local_keep, reference=reference or None, stride=stride,
                          first_index=shard.start, **(progress if fabric.global_rank == 0 else {}))
        kept = result["logprobs"]
        totals[0] = math.log(result["ppl"]) * result["tokens"]
        totals[1] = result["tokens"]
        if reference and result["kl_tokens"]:
            totals[2] = result["kl"] * result["kl_tokens"]
            totals[3] = result["kl_tokens"]
    totals = totals.to(fabric.device)
    torch.distributed.all_reduce(totals)
    totals = totals.cpu()
    out = {"ppl": math.exp(totals[0] / totals[1]), "tokens": int(totals[1]), "logprobs": kept}
    if reference is not None:
        out["kl"] = float(totals[2] / totals[3])
    return out
