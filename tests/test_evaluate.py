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


def peaked_model(seed: int, sharpness: float = 60.0) -> LlamaForCausalLM:
    """A tiny model whose next-token distributions are peaked (head weights × `sharpness`: on
    average 0.74 of the mass on one token of 64), unlike `tiny_model`'s nearly flat ones."""
    model = tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def float64_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, 64)


def coarse_kl(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """Σ KL of p and q coarsened to p's top-k ∪ {rest}, written out in float64."""
    top, idx = p.topk(k, -1)
    p_rest = p.scatter(-1, idx, float("-inf")).logsumexp(-1)
    q_rest = q.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return float((top.exp() * (top - q.gather(-1, idx))).sum() + (p_rest.exp() * (p_rest - q_rest)).sum())


def test_kl_runs_from_the_reference_to_the_evaluated_model_on_peaked_distributions():
    """`kl` is KL(reference ‖ model) = Σ p·(log p − log q), p the kept reference. With the flat
    logits of random models KL(p‖q) ≈ KL(q‖p) and a swapped direction passes every other test;
    a peaked model against a flat one sets the two directions 3× apart. References: float64 by hand."""
    windows = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(9))
    peaked, flat = peaked_model(0), tiny_model(1)
    p, q = float64_logprobs(peaked, windows), float64_logprobs(flat, windows)
    positions = p.shape[0]
    forward = float((p.exp() * (p - q)).sum()) / positions  # KL(peaked ‖ flat)
    backward = float((q.exp() * (q - p)).sum()) / positions  # KL(flat ‖ peaked)
    assert backward > 3 * forward
    for reference, evaluated, expected in ((peaked, flat, forward), (flat, peaked, backward)):
        full_rows = evaluate(reference, windows, "cpu", keep=3)["logprobs"]  # float16 rows
        assert evaluate(evaluated, windows, "cpu", reference=full_rows)["kl"] == pytest.approx(expected, rel=1e-3)
    # The top-k reference: its lower bound is the coarsened KL in the same direction.
    for reference, evaluated, p_ref, q_model in ((peaked, flat, p, q), (flat, peaked, q, p)):
        kept = evaluate(reference, windows, "cpu", keep=3, top_k=4)["logprobs"]
        result = evaluate(evaluated, windows, "cpu", reference=kept)
        assert result["kl_lower_bound"] == pytest.approx(coarse_kl(p_ref, q_model, 4) / positions, rel=1e-4)
    assert coarse_kl(p, q, 4) > 2 * coarse_kl(q, p, 4)  # the coarse KLs tell the directions apart too


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


# --------------------------------------------------------------------------------------------
# Several ranks: sums weighted by tokens, not means per rank
# --------------------------------------------------------------------------------------------

# 5 windows over 2 ranks: 3 and 2; with a stride of 9, window 0 scores 39 positions and the others
# 9 each (57 vs 18 tokens); the KL's 4 reference windows split 3 + 1 (57 vs 9 tokens).
SHARDED_WINDOWS = torch.randint(0, 64, (5, 40), generator=torch.Generator().manual_seed(11))


def _before_and_after(fabric) -> tuple[dict, dict, dict]:
    """What the app does around quantization, on `fabric`'s ranks: the original's perplexity and
    top-k reference (the first 4 windows), then the other model's perplexity and KL against it;
    and an evaluation with no reference windows kept (eval.kl_windows=0)."""
    from fabricq.evaluate import evaluate_sharded

    before = evaluate_sharded(fabric, peaked_model(0), SHARDED_WINDOWS, "cpu", keep=4, stride=9, top_k=4)
    after = evaluate_sharded(fabric, tiny_model(1), SHARDED_WINDOWS, "cpu", reference=before.pop("logprobs"),
                             stride=9, top_k=4)
    no_kl = evaluate_sharded(fabric, tiny_model(1), SHARDED_WINDOWS[:2], "cpu", reference=[], top_k=4)
    return before, after, no_kl


def _sharded_rank(rank: int, world: int, init_file: str, out: str) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fabric = SimpleNamespace(world_size=world, global_rank=rank, device=torch.device("cpu"))
        torch.save(_before_and_after(fabric), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_report_the_one_rank_perplexity_and_kl_with_unequal_shards(tmp_path):
    """ppl_before, ppl_after and kl_after of 2 gloo ranks equal 1 rank's on the same windows:
    the ranks' sums of NLL and KL are added and divided by the total tokens; a mean of the
    ranks' means would weigh rank 1's 18 (KL: 9) tokens like rank 0's 57."""
    from types import SimpleNamespace

    from conftest import spawn_ranks

    single = _before_and_after(SimpleNamespace(world_size=1, global_rank=0, device=torch.device("cpu")))
    ranks = spawn_ranks(_sharded_rank, tmp_path)
    # The shards are as unequal as intended, and their means differ (else any combination passes).
    shard = [evaluate(peaked_model(0), SHARDED_WINDOWS[part], "cpu", stride=9, first_index=part.start)
             for part in (range(0, 3), range(3, 5))]
    assert [r["tokens"] for r in shard] == [57, 18] and abs(shard[0]["ppl"] / shard[1]["ppl"] - 1) > 0.1
    one_before, one_after, _ = single
    for rank, (before, after, no_kl) in enumerate(ranks):
        assert math.isnan(no_kl["kl"]) and math.isnan(no_kl["kl_lower_bound"]) and no_kl["tokens"] == 78
        assert after["saved_s"] == 0.0  # nothing read from a cache
        assert before["tokens"] == one_before["tokens"] == after["tokens"] == 75
        assert before["ppl"] == pytest.approx(one_before["ppl"], rel=1e-6), rank  # 1 thread vs several
        assert after["ppl"] == pytest.approx(one_after["ppl"], rel=1e-6), rank
        assert after["kl"] == pytest.approx(one_after["kl"], rel=1e-6), rank
        assert after["kl_lower_bound"] == pytest.approx(one_after["kl_lower_bound"], rel=1e-6), rank
        assert (after["windows"], after["cached_windows"]) == (5, 0)


def test_kept_references_round_trip_through_named_tensors():
    """A rank's references as safetensors names (`window.part`) and back: top-k with and without
    the tail draws, and full rows; windows in order past 9 (`10.0` sorts before `2.0` as text)."""
    from fabricq.evaluate import reference_from_tensors, reference_tensors

    windows = torch.randint(0, 64, (12, 20), generator=torch.Generator().manual_seed(12))
    model = tiny_model(0)
    for kept in (evaluate(model, windows, "cpu", keep=12, top_k=4)["logprobs"],  # 5 parts (tail draws)
                 evaluate(model, windows[:2], "cpu", keep=2, top_k=64)["logprobs"],  # 3 parts (k = vocabulary)
                 evaluate(model, windows[:2], "cpu", keep=2)["logprobs"]):  # float16 rows
        tensors = reference_tensors(kept)
        back = reference_from_tensors(dict(reversed(list(tensors.items()))))
        assert len(back) == len(kept)
        for ours, theirs in zip(kept, back):
            if isinstance(ours, tuple):
                assert isinstance(theirs, tuple) and len(theirs) == len(ours)
                assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
            else:
                assert torch.equal(ours, theirs)
    assert len(evaluate(model, windows[:1], "cpu", keep=1, top_k=4)["logprobs"][0]) == 5
    assert len(evaluate(model, windows[:1], "cpu", keep=1, top_k=64)["logprobs"][0]) == 3


# --------------------------------------------------------------------------------------------
# Bounded memory: logits a chunk of positions at a time, against the whole-window computation
# --------------------------------------------------------------------------------------------


def whole_window_nll(model, window: torch.Tensor, scored: int) -> float:
    """The previous evaluator's computation: all logits, one log-softmax, the scored targets."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=window[None]).logits[0, :-1].to(torch.float64), -1)[-scored:]
    return float(-logprobs.gather(1, window[-scored:, None]).sum())


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_chunked_loss_equals_the_whole_window_loss(dtype, rel):
    from fabricq.evaluate import evaluate_window

    model = tiny_model(3).to(dtype)
    window = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(4))
    for scored in (299, 40):
        expected = whole_window_nll(model, window, scored)
        for chunk in (1, 7, 128, 4096):  # one position, ragged chunks, one chunk for everything
            result, _ = evaluate_window(model, window, "cpu", scored, chunk=chunk)
            assert result.tokens == scored
            assert result.nll == pytest.approx(expected, rel=rel, abs=0), (scored, chunk)
    if dtype is torch.float64:  # float64 rows: the chunked rows are the whole-window rows
        result, _ = evaluate_window(model, window, "cpu", 299, chunk=7, keep=True)
        with torch.no_grad():
            rows = F.log_softmax(model(input_ids=window[None]).logits[0, :-1], -1)
        assert torch.equal(result.reference, rows.to(torch.float16))


def test_models_whose_logits_are_not_the_plain_head_use_their_own_logits():
    """Gemma2 soft-caps its logits: the decoder-output × head shortcut would be wrong, so the
    evaluation must notice and fall back to the model's logits (still chunked afterwards)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, max_position_embeddings=128)).eval()
    windows = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(5))
    expected = sum(whole_window_nll(model, w, 49) for w in windows) / 98
    assert evaluate(model, windows, "cpu")["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_perplexity_on_stories260k_is_the_previous_evaluators(shared_path):
    """The real tiny model, default-style windows: the same perplexity as the whole-window
    computation, with and without a stride."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(shared_path("models", "stories260k"), dtype=torch.float32).eval()
    windows = torch.randint(1, 512, (3, 256), generator=torch.Generator().manual_seed(6))
    for stride in (None, 100):
        scored = [255 if stride is None or i == 0 else stride for i in range(3)]
        expected = sum(whole_window_nll(model, w, s) for w, s in zip(windows, scored)) / sum(scored)
        result = evaluate(model, windows, "cpu", stride=stride)
        assert result["tokens"] == sum(scored)
        assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)


# --------------------------------------------------------------------------------------------
# The top-k reference: a lower bound of the full KL, with the gap the chain rule predicts
# --------------------------------------------------------------------------------------------


def test_top_k_kl_bounds_the_full_kl_from_below_with_the_chain_rule_gap():
    """Coarsening both distributions to top-k ∪ {rest} loses exactly
    Σ_positions p(rest) · KL(p(·|rest) ‖ q(·|rest)) (chain rule of KL): so 0 ≤ full − top-k, the
    gap is that sum, it never grows with k, and k = vocabulary gives the full KL."""
    windows = torch.randint(0, 64, (2, 60), generator=torch.Generator().manual_seed(7))
    a, b = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        p = F.log_softmax(a(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, 64)
        q = F.log_softmax(b(input_ids=windows).logits[:, :-1].double(), -1).reshape(-1, 64)
    positions = p.shape[0]
    full = float((p.exp() * (p - q)).sum()) / positions
    assert evaluate(b, windows, "cpu", reference=evaluate(a, windows, "cpu", keep=2)["logprobs"])["kl"] == \
        pytest.approx(full, rel=1e-2)  # full float16 rows, as before
    previous = -1.0
    for k in (1, 4, 16, 63, 64):
        kept = evaluate(a, windows, "cpu", keep=2, top_k=k)["logprobs"]
        assert all(ref[0].shape == (59, k) and ref[2].shape == (59,) for ref in kept)
        kl = evaluate(b, windows, "cpu", reference=kept)["kl_lower_bound"]
        # The gap by the chain rule, from the full distributions (independent of fabricq's code).
        top = p.topk(k, -1).indices
        rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
        p_rest = torch.where(rest, p.exp(), 0).sum(-1)
        q_rest = torch.where(rest, q.exp(), 0).sum(-1)
        cond = torch.where(rest, p.exp() / p_rest[:, None].clamp_min(1e-300), 0)
        inner = torch.where(rest & (cond > 0), cond * ((p - p_rest[:, None].log()) - (q - q_rest[:, None].log())), 0)
        gap = float((p_rest * inner.sum(-1)).sum()) / positions
        assert kl <= full * (1 + 1e-5)
        assert full - kl == pytest.approx(gap, rel=1e-3, abs=1e-6), k
        assert kl >= previous - 1e-6  # more kept tokens: never a smaller KL
        previous = kl
    assert kl == pytest.approx(full, rel=1e-5)  # k = vocabulary: the full KL


def test_tail_samples_make_the_kl_estimate_unbiased():
    """The drawn tail tokens estimate p(rest)·KL(p(·|rest) ‖ q(·|rest)): exact when the tail is a
    single token (k = vocabulary − 1), and over independent draws (other window indices seed
    other draws) the mean estimate is the full KL within its standard error."""
    windows = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(8))
    a, b = tiny_model(0), tiny_model(1)
    with torch.no_grad():
        p = F.log_softmax(a(input_ids=windows).logits[:, :-1].double(), -1)
        q = F.log_softmax(b(input_ids=windows).logits[:, :-1].double(), -1)
    full = float((p.exp() * (p - q)).sum()) / 79
    one_token_tail = evaluate(a, windows, "cpu", keep=1, top_k=63)["logprobs"]
    assert evaluate(b, windows, "cpu", reference=one_token_tail)["kl"] == pytest.approx(full, rel=1e-5)
    estimates = []
    for seed in range(30):
        kept = evaluate(a, windows, "cpu", keep=1, top_k=2, first_index=seed)["logprobs"]
        result = evaluate(b, windows, "cpu", reference=kept, first_index=seed)
        assert result["kl_lower_bound"] < full  # k = 2 of 64: the bound alone misses much
        estimates.append(result["kl"])
    estimates = torch.tensor(estimates, dtype=torch.float64)
    assert len(set(estimates.tolist())) == 30  # the draws differ by seed
    error = 4 * float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - full) < error
    assert float(estimates.std()) < 0.5 * full  # 79 positions × 16 draws, 97% of the mass in the tail
