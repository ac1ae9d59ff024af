"""Folded act-order (`quant.actorder=folded`): the permutations are exact on the model, the folded
solves are the act-order solves, and the folded checkpoint is an ordinary grouped one that
transformers loads to the in-memory model's logits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.base import Callback
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.errors import FabricqError
from fabricq.checkpoint.compressed_tensors import save_compressed_checkpoint
from fabricq.quant.fold import (
    HeadLayout,
    as_contiguous_groups,
    fold_permutation,
    head_order,
    permute_result_columns,
    permute_result_rows,
    value_permutation,
)
from fabricq.quant.gptq import gptq_quantize, layer_objective, prepare_hessian
from fabricq.quant.grid import QuantScheme

LAYOUT = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=8)
SAMPLES = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1))


def tiny_llama(dtype=torch.float32, bias: bool = True) -> LlamaForCausalLM:
    """GQA (4 query heads, 2 KV heads of 8 channels) and biases on every projection, so the folds
    move biases too."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # non-zero biases (they start at zero)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


def problem(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) * torch.rand(cols, generator=g, dtype=torch.float64) * 3
    return torch.randn(rows, cols, generator=g), (x.T @ x / x.shape[0]).float()


# ---------------------------------------------------------------------------------------------
# The permutations
# ---------------------------------------------------------------------------------------------


def test_head_order_sorts_each_head_by_the_diagonal_summed_over_its_kv_group():
    diagonal = torch.rand(32, generator=torch.Generator().manual_seed(3))
    order = head_order(diagonal, LAYOUT)
    assert sorted(order.tolist()) == list(range(32))
    for head in range(4):
        block = order[head * 8 : (head + 1) * 8] - head * 8
        kv = head // 2  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        summed = diagonal[kv * 16 : kv * 16 + 8] + diagonal[kv * 16 + 8 : kv * 16 + 16]
        assert summed[block].tolist() == sorted(summed.tolist(), reverse=True)
    rows = value_permutation(order, LAYOUT)
    assert torch.equal(rows[:8], order[:8]) and torch.equal(rows[8:], order[16:24] - 8)


def test_value_permutation_refuses_what_does_not_fold():
    crossing = torch.arange(32)
    crossing[[7, 8]] = crossing[[8, 7]]
    with pytest.raises(ValueError, match="across heads"):
        value_permutation(crossing, LAYOUT)
    differing = torch.arange(32)
    differing[[8, 9]] = differing[[9, 8]]  # head 1 only; head 0 reads the same KV head
    with pytest.raises(ValueError, match="KV head 0"):
        value_permutation(differing, LAYOUT)


def fold_model(model, mlp_perm: torch.Tensor, o_perm: torch.Tensor) -> None:
    v_perm = value_permutation(o_perm, LAYOUT)
    with torch.no_grad():
        for layer in model.model.layers:
            for module, perm in ((layer.mlp.gate_proj, mlp_perm), (layer.mlp.up_proj, mlp_perm),
                                 (layer.self_attn.v_proj, v_perm)):
                module.weight.copy_(module.weight[perm])
                module.bias.copy_(module.bias[perm])
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, mlp_perm])
            layer.self_attn.o_proj.weight.copy_(layer.self_attn.o_proj.weight[:, o_perm])


def test_folding_the_unquantized_model_leaves_its_logits_unchanged():
    model = tiny_llama(torch.float64)
    want = model(SAMPLES).logits
    g = torch.Generator().manual_seed(5)
    mlp_perm = fold_permutation(torch.randint(0, 6, (48,), generator=g))
    o_perm = head_order(torch.rand(32, generator=g, dtype=torch.float64), LAYOUT)
    assert not torch.equal(mlp_perm, torch.arange(48)) and not torch.equal(o_perm, torch.arange(32))
    fold_model(model, mlp_perm, o_perm)
    torch.testing.assert_close(model(SAMPLES).logits, want, rtol=0, atol=1e-12)
    # Permuting v's rows without o's columns changes the function: the comparison can fail.
    broken = tiny_llama(torch.float64)
    with torch.no_grad():
        broken.model.layers[0].self_attn.v_proj.weight.copy_(broken.model.layers[0].self_attn.v_proj.weight.flip(0))
    assert (broken(SAMPLES).logits - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The folded solves are the act-order solves
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [8, 16])
def test_folded_down_proj_is_the_dynamic_solve_with_its_columns_reordered(group_size):
    """down_proj: the dynamic solve's groups, folded (columns ordered by group), are exactly the
    dynamic solve of the folded problem, its groups contiguous; and the identity-order solve of
    the problem permuted into act-order is the dynamic solve too. Same rounding, same objective."""
    weight, hessian = problem(24, 48, seed=2)
    scheme = QuantScheme(4, group_size, True, "dynamic")
    dynamic = gptq_quantize(weight, hessian, scheme, block_size=16)
    fold = fold_permutation(dynamic.g_idx)
    folded = as_contiguous_groups(permute_result_columns(dynamic, fold))
    assert folded.scheme.actorder == "static"
    direct = gptq_quantize(weight[:, fold], hessian[fold][:, fold], scheme, block_size=16)
    assert torch.equal(direct.codes, folded.codes) and torch.equal(direct.scale, folded.scale)
    assert torch.equal(direct.g_idx, folded.g_idx)

    order = prepare_hessian(hessian, "dynamic").perm
    plain = gptq_quantize(weight[:, order], hessian[order][:, order], QuantScheme(4, group_size, True, "none"),
                          block_size=16)
    assert torch.equal(plain.codes, dynamic.codes[:, order]) and torch.equal(plain.scale, dynamic.scale)
    want = layer_objective(weight, dynamic.dequantize(), hessian)
    got = layer_objective(weight[:, fold], folded.dequantize(), hessian[fold][:, fold])
    assert got == pytest.approx(want, rel=1e-9)
    static = gptq_quantize(weight, hessian, QuantScheme(4, group_size, True, "static"), block_size=16)
    assert not torch.equal(static.codes, dynamic.codes)  # the orders differ: the check above can fail


def test_o_proj_solve_order_is_the_head_order_and_folds_with_v():
    weight, hessian = problem(32, 32, seed=4)
    order = head_order(hessian.diagonal(), LAYOUT)
    scheme = QuantScheme(4, 4, True, "dynamic")
    from fabricq.quant.gptq import gptq_solve

    result = gptq_solve(weight, prepare_hessian(hessian, "dynamic", order=order), scheme, block_size=8)
    plain = gptq_quantize(weight[:, order], hessian[order][:, order], QuantScheme(4, 4, True, "none"), block_size=8)
    assert torch.equal(result.codes[:, order], plain.codes)
    fold = fold_permutation(result.g_idx)
    value_permutation(fold, LAYOUT)  # a fold v can follow
    folded = as_contiguous_groups(permute_result_columns(result, fold))
    assert torch.equal(folded.dequantize(), result.dequantize()[:, fold])
    with pytest.raises(ValueError, match="needs actorder 'dynamic'"):
        prepare_hessian(hessian, "static", order=order)


def test_row_permutation_of_packed_and_plain_results_is_exact():
    weight, hessian = problem(24, 48, seed=6)
    result = gptq_quantize(weight, hessian, QuantScheme(3, 8, False, "static"), block_size=16)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for held in (result, result.packed()):
        moved = permute_result_rows(held, perm)
        assert type(moved) is type(held)
        assert torch.equal(moved.dequantize(), result.dequantize()[perm])
        cols = permute_result_columns(held, torch.arange(48).flip(0))
        assert torch.equal(cols.dequantize(), result.dequantize().flip(1))


# ---------------------------------------------------------------------------------------------
# Runs of the calibration loop
# ---------------------------------------------------------------------------------------------


class LayerOutputs(Callback):
    """Keeps each layer's inputs and outputs as the loop produced them (gated: before the fold)."""

    def __init__(self):
        self.inputs = {0: None}
        self.outputs = {}

    def on_layer_complete(self, loop, index, next_inputs):
        if next_inputs is not None:
            self.outputs[index] = self.inputs[index + 1] = [h.clone() for h in next_inputs]


FOLDED_W4 = QuantScheme(4, 8, True, "folded")


def folded_run(true_sequential=True, model=None, extra=(), scheme=FOLDED_W4, ignore=()):
    model = model if model is not None else tiny_llama()
    # float16 scales: what the GPTQ format stores (exact in the float32 compressed-tensors export too)
    gptq = GPTQCallback(GPTQSettings(scheme=scheme, block_size=8, hessian_dtype=torch.float64,
                                     true_sequential=true_sequential, ignore=ignore, scale_dtype=torch.float16))
    loop = CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[gptq, *extra])
    loop.run()
    return model, gptq, loop


@pytest.mark.parametrize("true_sequential", [True, False])
def test_folded_run_keeps_the_quantized_function_and_loads_in_transformers(true_sequential, tmp_path):
    recorder = LayerOutputs()
    model, gptq, loop = folded_run(true_sequential, extra=[recorder])
    orders = {name.split(".", 3)[-1]: stats["actorder"] for name, stats in gptq.stats.items()}
    assert orders == {"self_attn.q_proj": "static", "self_attn.k_proj": "static", "self_attn.v_proj": "static",
                      "self_attn.o_proj": "dynamic", "mlp.gate_proj": "static", "mlp.up_proj": "static",
                      "mlp.down_proj": "dynamic"}
    modules = dict(model.named_modules())
    for name, qw in gptq.quantized.items():
        assert qw.scheme.actorder == "static" and torch.equal(qw.g_idx, torch.arange(qw.shape[1], dtype=torch.int32) // 8)
        assert torch.equal(modules[name].weight, qw.dequantize()), name  # in memory = held result
    # The folded layer 0 computes what the loop computed with it (gated: before its fold).
    with torch.no_grad():
        for hidden, kwargs, want in zip(recorder.inputs[1], loop.kwargs, recorder.outputs[1]):
            got = model.model.layers[1](hidden, **kwargs)
            torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want, rtol=0, atol=1e-5)
    save_compressed_checkpoint(model, gptq.quantized, tmp_path, dtype=torch.float32)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not [k for k in tensors if k.endswith("g_idx")]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["actorder"] for g in config["config_groups"].values()] == ["weight"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(SAMPLES).logits, model(SAMPLES).logits, rtol=0, atol=1e-5)
    # The GPTQ format: desc_act false, g_idx trivial, the same weights.
    from fabricq.checkpoint.gptq import save_gptq_checkpoint
    from fabricq.checkpoint.load import load_dequantized_gptq_state_dict

    save_gptq_checkpoint(model, gptq.quantized, tmp_path / "gptq", dtype=torch.float32)
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["desc_act"] is False
    state = load_dequantized_gptq_state_dict(tmp_path / "gptq")
    for name, qw in gptq.quantized.items():
        assert torch.equal(state[f"{name}.weight"].float(), qw.dequantize()), name


def test_a_fold_that_would_change_the_function_falls_back_to_static(caplog):
    """An MLP whose activation mixes channels (not channel-wise: the fold would not be exact) is
    caught by the layer check; an ignored gate_proj cannot be permuted with its result."""
    class MixingActivation(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.silu(x) + x.roll(1, dims=-1)

    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp.act_fn = MixingActivation()
    with caplog.at_level(logging.INFO, logger="fabricq"):
        _, gptq, _ = folded_run(model=model, ignore=(r"layers\.1\.self_attn\.v_proj",))
    stats = gptq.stats
    assert stats["model.layers.0.mlp.down_proj"]["actorder"] == "static"
    assert stats["model.layers.0.self_attn.o_proj"]["actorder"] == "dynamic"
    assert stats["model.layers.1.self_attn.o_proj"]["actorder"] == "static"
    assert "mlp.down_proj solved with static act-order (permuting its input channels changes" in caplog.text
    assert "self_attn.o_proj solved with static act-order (self_attn.v_proj is left unquantized)" in caplog.text


def test_fused_projections_fall_back_to_static(caplog):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=0)).eval()
    with caplog.at_level(logging.INFO, logger="fabricq"):
        _, gptq, _ = folded_run(model=model)
    assert {s["actorder"] for s in gptq.stats.values()} == {"static"}
    assert "o_proj solved with static act-order (self_attn.v_proj is not in this layer" in caplog.text
    assert "down_proj solved with static act-order (mlp.gate_proj is not in this layer" in caplog.text


def test_dynamic_for_compressed_tensors_is_refused_pointing_to_folded():
    from types import SimpleNamespace

    from fabricq.checkpoint.engines import check_export_config

    with pytest.raises(FabricqError, match="quant.actorder=folded"):
        check_export_config(SimpleNamespace(format="compressed-tensors"), SimpleNamespace(actorder="dynamic"))
    check_export_config(SimpleNamespace(format="compressed-tensors"), SimpleNamespace(actorder="folded"))


def test_resumed_folded_run_matches_the_uninterrupted_one(tmp_path):
    """Crash after layer 0's commit, restore (folded results, biases refolded) into a fresh model,
    continue: the same results and the same model weights and biases as one uninterrupted run."""
    from fabricq.callbacks.checkpoint import CheckpointCallback
    from fabricq.resume import WorkDirectory

    class Crash(Exception):
        pass

    class CrashAfter(CheckpointCallback):
        def on_layer_complete(self, loop, index, next_inputs):
            super().on_layer_complete(loop, index, next_inputs)
            raise Crash

    reference_model, reference, _ = folded_run()
    work = WorkDirectory(tmp_path / ".out.work")
    work.prepare("auto", {"x": 1})
    first = GPTQCallback(reference.settings)
    with pytest.raises(Crash):
        CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2,
                        callbacks=[first, CrashAfter(work, first)]).run()
    work.close()
    work = WorkDirectory(tmp_path / ".out.work")
    assert work.prepare("auto", {"x": 1}) is True
    model = tiny_llama()
    resumed = GPTQCallback(first.settings)
    loop = CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[resumed])
    inputs = work.restore(0, model, resumed, loop.cache)
    loop.run(start_layer=1, inputs=inputs)
    work.close()
    for name, qw in reference.quantized.items():
        assert torch.equal(qw.codes, resumed.quantized[name].codes), name
    want = reference_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_two_ranks_write_the_one_rank_folded_checkpoint(shared_path, tmp_path):
    """`-m trainer.devices=1,2` on stories260k (GQA: 8 query heads, 4 KV heads) with float64
    Hessians: every rank folds the results it solved and those it received the same way, so both
    jobs write the same checkpoint."""
    from conftest import run_cli
    from test_distributed import _assert_identical, _small

    # (a longer rendezvous timeout than test_distributed's: the ranks start slowly on a loaded host)
    small = [a for a in _small(shared_path) if not a.startswith("distributed.timeout_s=")]
    result = run_cli("-m", "recipe=gptq_w4", *small, "distributed.timeout_s=300", "quant.hessian_dtype=float64",
                     "quant.actorder=folded", "quant.group_size=4",
                     "trainer.devices=1,2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = tmp_path / "0", tmp_path / "1"
    _assert_identical(one, two)
    report = json.loads((one / "report.json").read_text())
    assert {m["actorder"] for n, m in report["modules"].items() if n.endswith(("down_proj", "o_proj"))} == {"dynamic"}


def test_tp_aware_turns_a_dynamic_run_into_a_folded_one():
    from fabricq.api import compose_config

    _, dynamic = compose_config("gptq_w4", ["quant.actorder=dynamic", "export.format=gptq"])
    assert dynamic.quant.actorder == "dynamic"
    _, aware = compose_config("gptq_w4", ["quant.actorder=dynamic", "export.tp_aware=true"])
    assert aware.quant.actorder == "folded"  # and compressed-tensors is no longer refused
    for actorder in ("none", "static", "folded"):  # groups already contiguous: left as asked
        assert compose_config("gptq_w4", [f"quant.actorder={actorder}", "export.tp_aware=true"])[1].quant.actorder \
            == actorder
    with pytest.raises(FabricqError, match="export.tp_aware must be true or false"):
        compose_config("gptq_w4", ["export.tp_aware=yes"])


def test_tp_aware_dynamic_run_writes_the_folded_checkpoint(shared_path, tmp_path):
    from conftest import run_cli
    from test_distributed import _assert_identical, _small

    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float64",
                     "quant.group_size=4", "quant.actorder=folded,dynamic", "export.tp_aware=true",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(tmp_path / "0", tmp_path / "1")
    assert "g_idx" not in (tmp_path / "1" / "config.json").read_text()
    assert json.loads((tmp_path / "1" / "report.json").read_text())["scheme"]["actorder"] == "folded"  # as solved
