"""Recovery fine-tuning, the math: LoRA on a quantized Linear against a plain reference, lora vs
qlora, the EoRA start against a direct SVD reference, and the teacher's top-k distillation loss
against the full KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fabricq.errors import FabricqError
from fabricq.quant.gptq import rtn_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.recovery import eora, teacher
from fabricq.recovery.lora import LoRALinear, attach_lora, check_rank, select_targets


def quantized_weight(rows=24, cols=32, bits=4, group=8, symmetric=True, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w, rtn_quantize(w, QuantScheme(bits, group, symmetric, "none"))


def reference_dequant(qw) -> torch.Tensor:
    """(code - zero) · scale, column by column: the grid's definition, written out."""
    out = torch.empty(qw.codes.shape)
    for c in range(qw.codes.shape[1]):
        g = int(qw.g_idx[c])
        out[:, c] = (qw.codes[:, c].float() - qw.zero[:, g]) * qw.scale[:, g]
    return out


# ---------------------------------------------------------------------------------------------
# LoRA on a quantized Linear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "qlora"])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, True), (4, False)])
def test_lora_forward_and_gradients_match_plain_reference(mode, bits, symmetric):
    _, qw = quantized_weight(bits=bits, symmetric=symmetric)
    bias = torch.randn(24)
    module = LoRALinear(qw, rank=4, alpha=8, mode=mode, bias=bias)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    module.set_adapter(a, b)
    x = torch.randn(3, 5, 32, generator=gen, requires_grad=True)
    y = module(x)

    # The reference: plain tensors and autograd, W from the grid's definition.
    w = reference_dequant(qw)
    a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ w.T + bias + (8 / 4) * (x_ref @ a_ref.T) @ b_ref.T
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    upstream = torch.randn(y.shape, generator=gen)
    y.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(module.lora_A.grad, a_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.lora_B.grad, b_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    assert module.bias.grad is None and not module.bias.requires_grad


def test_qlora_holds_packed_codes_only():
    _, qw = quantized_weight(rows=64, cols=128, bits=4, group=32)
    packed = LoRALinear(qw, rank=2, alpha=2, mode="qlora")
    dense = LoRALinear(qw, rank=2, alpha=2, mode="lora")
    assert not hasattr(packed, "weight")
    base_bytes = sum(t.numel() * t.element_size() for n, t in packed.named_buffers())
    dense_bytes = dense.weight.numel() * dense.weight.element_size()
    # 4-bit codes are 1/8 of float32; scales (one per 32 columns) add 1/32 of it, groups 1/64.
    assert packed.packed_codes.numel() * 4 == 64 * 128 // 2
    assert base_bytes < dense_bytes * (1 / 8 + 1 / 32 + 1 / 32 + 1 / 64 + 1e-9)
    torch.testing.assert_close(packed.base_weight(), dense.weight, rtol=0, atol=0)


def test_packed_backward_keeps_no_dense_weight():
    """The qlora backward dequantizes again: autograd saves none of the (rows, cols) weight."""
    _, qw = quantized_weight(rows=48, cols=64)
    module = LoRALinear(qw, rank=2, alpha=2, mode="qlora")
    saved = []
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        module(x).sum().backward()
    assert (48, 64) not in saved and (64, 48) not in saved
    assert x.grad is not None


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _rtn_model(seed=0):
    model = _tiny_llama(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    modules = dict(model.named_modules())
    quantized = {n: rtn_quantize(modules[n].weight.detach(), QuantScheme(4, 16, True, "none")) for n in names}
    return model, quantized


def test_attach_freezes_base_and_starts_at_base_output():
    model, quantized = _rtn_model()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    # The base as a plain model with the dequantized weights.
    reference = _tiny_llama()
    with torch.no_grad():
        for name, qw in quantized.items():
            reference.get_submodule(name).weight.copy_(reference_dequant(qw))
    lora = attach_lora(model, quantized, list(quantized), rank=4, alpha=8, mode="qlora", seed=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.lora_{x}" for n in lora for x in "AB")
    assert all(float(m.lora_A.detach().abs().sum()) > 0 and not m.lora_B.detach().any() for m in lora.values())
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _train(mode: str, steps=4, seed=0):
    import tempfile
    from pathlib import Path

    from lightning.fabric import Fabric

    from fabricq.recovery.settings import TrainSettings
    from fabricq.recovery.train import CheckpointStore, train

    model, quantized = _rtn_model()
    lora = attach_lora(model, quantized, list(quantized), rank=4, alpha=8, mode=mode, seed=seed)
    windows = torch.randint(0, 96, (steps * 2, 12), generator=torch.Generator().manual_seed(5))
    settings = TrainSettings(steps=steps, lr=1e-2, batch_size=1, grad_accum=2, loss="lm", logit_chunk=5, seed=seed)
    fabric = Fabric(accelerator="cpu", devices=1)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(fabric, model, lora, windows, None, settings=settings, store=CheckpointStore(Path(tmp)),
                       show_progress=False)
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora.items()}, result


def test_lora_and_qlora_train_the_same_adapter():
    dense, result = _train("lora")
    packed, _ = _train("qlora")
    assert result.loss_curve and result.steps == 4
    moved = 0
    for name in dense:
        torch.testing.assert_close(packed[name][0], dense[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed[name][1], dense[name][1], rtol=1e-5, atol=1e-6)
        moved += float(dense[name][1].abs().sum()) > 0
    assert moved == len(dense)  # every B left zero: the adapters did train


def test_ranks_read_disjoint_windows_and_equal_global_batches_match():
    from fabricq.recovery.settings import TrainSettings
    from fabricq.recovery.train import local_window_order

    two = [local_window_order(TrainSettings(steps=5, batch_size=2, grad_accum=1), 2, r) for r in range(2)]
    one = local_window_order(TrainSettings(steps=5, batch_size=2, grad_accum=2), 1, 0)
    assert not set(two[0].tolist()) & set(two[1].tolist())
    assert sorted(torch.cat(two).tolist()) == list(range(20)) == sorted(one.tolist())
    for step in range(5):  # each step: the same 4 windows, rank r's share = one rank's micro-batch r
        assert torch.equal(torch.cat([two[0][2 * step:2 * step + 2], two[1][2 * step:2 * step + 2]]),
                           one[4 * step:4 * step + 4])


def test_target_selection_and_rank_checks():
    quantized = {f"model.layers.{i}.{m}": object() for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert select_targets(quantized, None) == list(quantized)
    assert select_targets(quantized, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select_targets(quantized, ["re:.*\\.1\\..*"]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(FabricqError, match="matches nothing"):
        select_targets(quantized, ["k_proj"])
    with pytest.raises(FabricqError, match="unquantized"):
        select_targets(quantized, ["lm_head"], other_linear=["lm_head"])
    _, qw = quantized_weight(rows=24, cols=32)
    check_rank(24, {"m": qw}, ["m"])
    with pytest.raises(FabricqError, match="larger than m's width 24"):
        check_rank(25, {"m": qw}, ["m"])


# ---------------------------------------------------------------------------------------------
# EoRA
# ---------------------------------------------------------------------------------------------


def _psd(n, tokens, seed):
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] *= 10  # an uneven spectrum, as activations have
    return x.T @ x / tokens


@pytest.mark.parametrize("rows, ranks, scaling", [(12, (1, 3, 7), 2.0), (6, (2,), 0.5)])
def test_eora_equals_direct_svd_reference(rows, ranks, scaling):
    """The issue's formula, directly: SVD of E·H^{1/2} (symmetric root by eigendecomposition),
    truncated, mapped back with H^{-1/2}. The implementation uses a Cholesky factor instead, and
    the Gram matrix of the smaller side (6 rows: fewer outputs than inputs, as k/v and down_proj)."""
    gen = torch.Generator().manual_seed(rows)
    error = torch.randn(rows, 10, generator=gen, dtype=torch.float64)
    hessian = _psd(10, 40, rows + 1)
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(10, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(damped)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    inv_root = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    u, s, vh = torch.linalg.svd(error @ root)
    for rank in ranks:
        expected = (u[:, :rank] * s[:rank]) @ vh[:rank] @ inv_root
        a, b = eora.eora_factors(error, eora.hessian_factor(hessian, 0.01), rank, scaling=scaling)
        assert a.shape == (rank, 10) and b.shape == (rows, rank)
        torch.testing.assert_close((scaling * b.double() @ a.double()), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 10), (7, 10), (10, 10)])
def test_top_singular_matches_the_full_svd(shape):
    """The leading singular triplets from the Gram matrix's eigendecomposition are the SVD's (up
    to each pair's common sign), for tall, wide and square matrices."""
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for rank in (1, 3, min(shape)):
        got_u, got_s, got_vh = eora.top_singular(m, rank)
        torch.testing.assert_close(got_s, s[:rank], rtol=1e-10, atol=1e-12)
        signs = (got_u * u[:, :rank]).sum(0).sign()
        torch.testing.assert_close(got_u * signs, u[:, :rank], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(got_vh * signs[:, None], vh[:rank], rtol=1e-8, atol=1e-10)


def test_eora_is_optimal_against_other_rank_r_corrections():
    gen = torch.Generator().manual_seed(2)
    error = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    hessian = _psd(12, 30, 3)
    a, b = eora.eora_factors(error, eora.hessian_factor(hessian, 0.01), 3)
    best = eora.weighted_error(error - b.double() @ a.double(), hessian)
    assert best < eora.weighted_error(error, hessian)
    u, s, vh = torch.linalg.svd(error)  # the plain (unweighted) rank-3 SVD: a worse fit in this norm
    assert best < eora.weighted_error(error - (u[:, :3] * s[:3]) @ vh[:3], hessian)
    for trial in range(20):
        noise = 0.05 * torch.randn(16, 3, generator=gen, dtype=torch.float64)
        assert best <= eora.weighted_error(error - (b.double() + noise) @ a.double(), hessian) + 1e-9


def test_eora_start_reduces_every_modules_weighted_error(shared_path):
    """On the tiny real model, W4 g32: every module's tr(E·H·Eᵀ) goes down, H recomputed here."""
    from transformers import AutoModelForCausalLM

    folder = shared_path("models", "stories260k")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    quantized = {n: rtn_quantize(original[n], QuantScheme(4, 32 if original[n].shape[1] % 32 == 0 else -1, True, "none"))
                 for n in names}
    lora = attach_lora(model, quantized, names, rank=8, alpha=16, mode="lora")
    windows = torch.randint(3, 512, (6, 48), generator=torch.Generator().manual_seed(0))
    # Hessians of the quantized model's inputs, independently: hooks on a plain forward.
    sums = {n: torch.zeros(quantized[n].shape[1], quantized[n].shape[1], dtype=torch.float64) for n in names}
    def observe(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name].add_(x.T @ x)
        return hook

    hooks = [lora[n].register_forward_pre_hook(observe(n)) for n in names]
    with torch.no_grad():
        for m in lora.values():
            m.lora_B.zero_()
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    stats = eora.initialize(model, lora, dict(original), windows, batch_size=2, device="cpu")
    assert sorted(stats) == sorted(names)
    for name in names:
        error = original[name].double() - quantized[name].dequantize().double()
        before = eora.weighted_error(error, sums[name])
        after = eora.weighted_error(error - lora[name].delta_weight().double(), sums[name])
        assert after < 0.9 * before, name
        # The reported errors are tr(E·H·Eᵀ) on the mean Hessian (all 6 × 48 positions).
        tokens = windows.numel()
        assert stats[name]["error_before"] == pytest.approx(before / tokens, rel=1e-6)
        assert stats[name]["error_after"] == pytest.approx(after / tokens, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Teacher top-k
# ---------------------------------------------------------------------------------------------


def test_teacher_storage_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    targets = teacher.TeacherTargets(
        indices=torch.randint(0, 50, (3, 7, 4), generator=gen, dtype=torch.int32),
        logprobs=torch.randn(3, 7, 4, generator=gen), rest=torch.randn(3, 7, generator=gen),
        temperature=1.5, digest=teacher.windows_digest(torch.arange(24).view(3, 8)))
    path = tmp_path / "teacher.safetensors"
    teacher.save_teacher(targets, path)
    back = teacher.load_teacher(path)
    assert torch.equal(back.indices, targets.indices) and torch.equal(back.logprobs, targets.logprobs)
    assert torch.equal(back.rest, targets.rest) and back.temperature == 1.5 and back.digest == targets.digest
    windows = torch.arange(24).view(3, 8)
    assert teacher.teacher_matches(back, windows, 4, 1.5)
    assert not teacher.teacher_matches(back, windows + 1, 4, 1.5)
    assert not teacher.teacher_matches(back, windows, 5, 1.5) and not teacher.teacher_matches(back, windows, 4, 1.0)
    # A flipped byte inside the tensors (header intact) no longer matches the stored sha256.
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert teacher.load_teacher(path) is None
    path.write_bytes(b"torn")
    assert teacher.load_teacher(path) is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_is_a_lower_bound_that_grows_to_the_full_kl(temperature):
    gen = torch.Generator().manual_seed(0)
    t_logits = 3 * torch.randn(5, 40, generator=gen)
    s_logits = t_logits + torch.randn(5, 40, generator=gen)
    full = float(teacher.full_kl(t_logits, s_logits, temperature))
    previous = 0.0
    for k in (1, 2, 4, 8, 16, 32, 40):
        top, idx, rest = teacher.top_and_rest(F.log_softmax(t_logits / temperature, -1), k)
        value = float(teacher.topk_kl(s_logits, idx, top, rest, temperature))
        assert -1e-6 <= value <= full + 1e-5
        assert value >= previous - 1e-6  # merging fewer outcomes never lowers the KL
        previous = value
    assert math.isclose(previous, full, rel_tol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_helpers_run_from_teacher_to_student_on_peaked_distributions(temperature):
    """`full_kl` and `topk_kl` are KL(teacher ‖ student). Random logits of equal spread give
    KL(p‖q) ≈ KL(q‖p), where a swapped direction passes; a peaked distribution against a flat
    one sets the directions far apart, each way round. References: float64, written out."""
    gen = torch.Generator().manual_seed(3)
    peaked = 12 * torch.randn(6, 50, generator=gen)  # most of the mass on one token
    flat = 0.3 * torch.randn(6, 50, generator=gen)

    def logprobs(logits):
        return F.log_softmax(logits.double() / temperature, -1)

    def kl(p, q):
        return float((p.exp() * (p - q)).sum()) * temperature**2

    def coarse(p, q, k):
        top, idx = p.topk(k, -1)
        p_rest = p.scatter(-1, idx, float("-inf")).logsumexp(-1)
        q_rest = q.scatter(-1, idx, float("-inf")).logsumexp(-1)
        terms = (top.exp() * (top - q.gather(-1, idx))).sum() + (p_rest.exp() * (p_rest - q_rest)).sum()
        return float(terms) * temperature**2

    p, q = logprobs(peaked), logprobs(flat)
    assert kl(q, p) > 3 * kl(p, q)
    for t_logits, s_logits in ((peaked, flat), (flat, peaked)):
        t, s = logprobs(t_logits), logprobs(s_logits)
        assert float(teacher.full_kl(t_logits, s_logits, temperature)) == pytest.approx(kl(t, s), rel=1e-4)
        top, idx, rest = teacher.top_and_rest(F.log_softmax(t_logits / temperature, -1), 4)
        value = float(teacher.topk_kl(s_logits, idx, top, rest, temperature))
        assert value == pytest.approx(coarse(t, s, 4), rel=1e-4)


def test_topk_kl_gradient_is_zero_at_the_teacher():
    t_logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    top, idx, rest = teacher.top_and_rest(F.log_softmax(t_logits, -1), 5)
    student = t_logits.clone().requires_grad_()
    loss = teacher.topk_kl(student, idx, top, rest)
    loss.backward()
    assert abs(float(loss)) < 1e-5 and float(student.grad.abs().max()) < 1e-5


def test_compute_teacher_matches_the_models_own_distribution():
    model = _tiny_llama()
    windows = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    targets = teacher.compute_teacher(model, windows, k=6, temperature=1.0, device="cpu", chunk=3)
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=windows).logits[:, :-1], -1)
    top, idx = logprobs.topk(6, -1)
    torch.testing.assert_close(targets.logprobs, top, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets.indices.long(), idx)
    expected_rest = torch.log1p(-top.exp().sum(-1))
    torch.testing.assert_close(targets.rest, expected_rest, rtol=1e-4, atol=1e-5)


def test_check_head_reads_a_prefix_and_refuses_scaled_logits():
    """The head check runs the model on at most CHECK_POSITIONS tokens of the window (a whole
    window's vocabulary logits would be the teacher's largest allocation), and still refuses a
    model whose logits are not output embedding(decoder output)."""
    model = _tiny_llama()
    window = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(2))
    lengths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    teacher.check_head(model, window, "cpu")
    hook.remove()
    assert lengths and max(lengths) == teacher.CHECK_POSITIONS
    original_forward = model.forward

    def scaled(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    with pytest.raises(FabricqError, match="does not compute its logits"):
        teacher.check_head(model, window, "cpu")


# ---------------------------------------------------------------------------------------------
# merge=true: re-quantizing base + adapter on the exported grid
# ---------------------------------------------------------------------------------------------


def _merge_case(symmetric: bool, seed=0):
    from fabricq.quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)  # unequal column scales
    x[:, 8:16] += x[:, :8]  # correlated columns: GPTQ's error feedback matters
    hessian = x.T @ x / x.shape[0]
    grid = gptq_quantize(w, hessian, QuantScheme(4, 16, symmetric, "static"))
    return w, hessian, grid


@pytest.mark.parametrize("symmetric", [True, False])
def test_requantize_keeps_the_grid_and_beats_rounding_on_it(symmetric):
    from fabricq.recovery.merge import requantize_on_grid

    _, hessian, grid = _merge_case(symmetric)
    delta = 0.3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) @ torch.randn(4, 64) / 8
    target = grid.dequantize() + delta
    merged = requantize_on_grid(target, grid.packed(), hessian)
    assert torch.equal(merged.scale, grid.scale) and torch.equal(merged.zero, grid.zero)
    assert torch.equal(merged.g_idx, grid.g_idx)
    assert int(merged.codes.min()) >= grid.scheme.qmin and int(merged.codes.max()) <= grid.scheme.qmax
    # Against rounding each merged weight to its nearest point of the same grid (written out):
    col_scale = grid.scale[:, grid.g_idx.long()]
    col_zero = grid.zero[:, grid.g_idx.long()]
    nearest = ((target / col_scale).round() + col_zero).clamp(grid.scheme.qmin, grid.scheme.qmax)
    rounded = (nearest - col_zero) * col_scale

    def objective(q):
        e = (target - q).double()
        return float(((e @ hessian.double()) * e).sum())

    assert objective(merged.dequantize()) < objective(rounded)
    # The merge moved codes: the base's grid points are not the answer for base + adapter.
    assert objective(merged.dequantize()) < objective(grid.dequantize())


def test_requantize_without_correlations_is_rounding_and_keeps_grid_points():
    from fabricq.recovery.merge import requantize_on_grid

    _, _, grid = _merge_case(True)
    # A diagonal Hessian spreads no error between columns: GPTQ is rounding to nearest.
    diagonal = torch.diag(torch.linspace(0.5, 2.0, 64))
    target = grid.dequantize() + 0.02 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    merged = requantize_on_grid(target, grid, diagonal)
    col_scale = grid.scale[:, grid.g_idx.long()]
    expected = ((target / col_scale).round() + grid.zero[:, grid.g_idx.long()]).clamp(grid.scheme.qmin, grid.scheme.qmax)
    assert torch.equal(merged.codes.float(), expected)
    # Weights already on the grid (an adapter of zeros) keep their codes under any Hessian.
    _, hessian, _ = _merge_case(True)
    assert torch.equal(requantize_on_grid(grid.dequantize(), grid, hessian).codes, grid.codes)


# ---------------------------------------------------------------------------------------------
# Training memory: the step's activation-sized temporaries get their own mappings
# ---------------------------------------------------------------------------------------------

# Bytes glibc has mapped for 64 blocks of 512 KiB alive (mallinfo2's hblkhd), before, inside and after
# `mapping_small_blocks`, in a fresh process under the run's heap policy.
SMALL_BLOCKS = """
import ctypes, torch
from fabricq.sysmem import mapping_small_blocks, return_large_blocks_to_os
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
assert return_large_blocks_to_os()
def mapped_for_blocks(keep):
    info = libc.mallinfo2()
    count = info.fordblks // (512 << 10) + 16  # more 512 KiB blocks than the heap's free room holds
    keep += [torch.empty(128 << 10, dtype=torch.float32) for _ in range(count)]  # alive: no room reused
    return libc.mallinfo2().hblkhd - info.hblkhd
keep = []
before = mapped_for_blocks(keep)
with mapping_small_blocks():
    inside = mapped_for_blocks(keep)
print(before, inside, mapped_for_blocks(keep))
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="glibc ≥ 2.33 only")
def test_training_steps_map_activation_sized_blocks_on_their_own_then_restore_the_policy():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SMALL_BLOCKS], capture_output=True, text=True, check=True)
    before, inside, after = (int(v) for v in out.stdout.split())
    assert before == 0  # below the 2 MiB threshold: heap blocks
    # Each its own mapping, except those the heap's free room holds (glibc serves a block from free
    # chunks before it maps one): at least the 16 blocks beyond that room.
    assert inside >= 16 * (512 << 10)
    assert after == 0  # the run's policy is back
