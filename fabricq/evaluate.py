"""Perplexity and KL divergence of a causal LM on held-out token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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


@torch.no_grad()
def evaluate(
    model, windows: torch.Tensor, device, keep: int = 0, reference: list | None = None, desc: str | None = None
) -> dict:
    """Perplexity over all windows; optionally keep the first `keep` windows' log-probs (float16,
    to compare against later) and/or the mean KL(reference ‖ model) over the reference windows.
    With `desc`, a progress bar with an ETA (a full WikiText-2 pass takes minutes on a CPU)."""
    nll, tokens, kept, kl_sum, kl_tokens = 0.0, 0, [], 0.0, 0
    bar = tqdm(windows, desc=desc, unit="window", disable=desc is None, mininterval=5)
    for i, window in enumerate(bar):
        logprobs = next_token_logprobs(model, window, device)
        targets = window[1:].to(logprobs.device)
        nll += float(-logprobs.gather(1, targets[:, None]).sum())
        tokens += targets.numel()
        if i < keep:
            kept.append(logprobs.to(torch.float16).cpu())
        if reference is not None and i < len(reference):
            kl_sum += _kl_sum(reference[i].to(logprobs.device), logprobs)
            kl_tokens += targets.numel()
    result = {"ppl": math.exp(nll / tokens), "tokens": tokens, "logprobs": kept}
    if reference is not None:
        result["kl"] = kl_sum / kl_tokens
    return result
