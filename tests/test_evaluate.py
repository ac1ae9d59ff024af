"""Perplexity and KL against direct computations with torch's own loss functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fabricq.evaluate import evaluate


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=600)
    return LlamaForCausalLM(config).eval()


def test_perplexity_and_kl_match_torch_losses():
    windows = torch.randint(0, 64, (3, 520), generator=torch.Generator().manual_seed(0))
    a, b = tiny_model(0), tiny_model(1)
    first = evaluate(a, windows, "cpu", keep=2)
    second = evaluate(b, windows, "cpu", reference=first["logprobs"])
    with torch.no_grad():
        logits_a = a(input_ids=windows).logits[:, :-1].float()
        logits_b = b(input_ids=windows).logits[:, :-1].float()
    nll = F.cross_entropy(logits_a.reshape(-1, 64), windows[:, 1:].reshape(-1))
    assert first["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert first["tokens"] == 3 * 519
    # KL(a ‖ b) over the first two windows (the kept reference), mean per token.
    kl = F.kl_div(F.log_softmax(logits_b[:2], -1), F.log_softmax(logits_a[:2], -1),
                  log_target=True, reduction="sum") / (2 * 519)
    assert second["kl"] == pytest.approx(float(kl), rel=1e-2)
    assert evaluate(a, windows, "cpu", reference=first["logprobs"])["kl"] == pytest.approx(0, abs=1e-4)


def test_sliding_windows_score_only_the_new_tokens():
    """With a stride, window 0 scores all its predictions and every later window only its last
    `stride`; KL covers the same positions. Reference: cross-entropy over exactly those positions."""
    windows = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(2))
    a, b = tiny_model(0), tiny_model(1)
    stride = 9
    first = evaluate(a, windows, "cpu", keep=4, stride=stride)
    second = evaluate(b, windows, "cpu", reference=first["logprobs"], stride=stride)
    with torch.no_grad():
        logits_a = a(input_ids=windows).logits[:, :-1].float()
        logits_b = b(input_ids=windows).logits[:, :-1].float()
    # Position mask over the 39 predictions per window: all of window 0, the last 9 of the others.
    mask = torch.zeros(4, 39, dtype=torch.bool)
    mask[0] = True
    mask[1:, -stride:] = True
    nll = F.cross_entropy(logits_a[mask], windows[:, 1:][mask])
    assert first["tokens"] == 39 + 3 * stride
    assert first["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    kl = F.kl_div(F.log_softmax(logits_b[mask], -1), F.log_softmax(logits_a[mask], -1),
                  log_target=True, reduction="sum") / mask.sum()
    assert second["kl"] == pytest.approx(float(kl), rel=1e-2)
    # Split in two (as ranks do): the second part knows its windows are not the first.
    head = evaluate(a, windows[:1], "cpu", stride=stride)
    tail = evaluate(a, windows[1:], "cpu", stride=stride, first_index=1)
    combined = (math.log(head["ppl"]) * head["tokens"] + math.log(tail["ppl"]) * tail["tokens"])
    assert head["tokens"] + tail["tokens"] == first["tokens"]
    assert math.exp(combined / first["tokens"]) == pytest.approx(first["ppl"], rel=1e-6)
