"""The Python API `fabricq.quantize`: the command line's checkpoint bit for bit on the same tokens
(float64 Hessians), with and without a Fabric; padded windows (attention_mask) leave the Hessians
as the unpadded sequences give them; bad input is one FabricqError before any weight changes, and a
failure midway puts every weight back."""

from __future__ import annotations

import json

import pytest
import torch
from cli_reference import API_OVERRIDES, assert_same_tensors, load_tiny
from safetensors.torch import load_file
from torch import nn

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.base import Callback
from fabricq.callbacks.hessians import SharedInputHessians
from fabricq.errors import FabricqError


def test_api_without_fabric_writes_the_cli_checkpoint(cli_w4_reference, stories260k_path, tmp_path):
    import fabricq

    windows, expected = cli_w4_reference
    model = load_tiny(stories260k_path)
    result = fabricq.quantize(model, windows, recipe="gptq_w4", overrides=API_OVERRIDES)
    assert len(result.quantized) == 35 and result.report["calibration"]["samples"] == 13
    assert result.report["scheme"]["bits"] == 4 and set(result.report["modules"]) == set(result.quantized)
    out = result.save(tmp_path / "api")
    assert_same_tensors(load_file(out / "model.safetensors"), expected)
    saved = json.loads((out / "report.json").read_text())
    assert saved["calibration"] == result.report["calibration"] and saved["export"]["formats"] == ["."]
    # The model in memory holds the dequantized weights the checkpoint stores.
    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict

    dequantized = load_dequantized_state_dict(out)
    name = "model.layers.2.mlp.down_proj"
    assert torch.equal(dict(model.named_modules())[name].weight, dequantized[f"{name}.weight"].float())
    with pytest.raises(FabricqError, match="exists and is not empty"):  # never overwritten silently
        result.save(out)


def test_api_evaluation_matches_plain_transformers_and_keeps_a_compact_reference(cli_w4_reference, stories260k_path):
    """eval_ids: perplexity before equals the mean next-token loss transformers computes itself;
    after quantization it rises and the KL (estimate and top-k lower bound) is positive."""
    import fabricq

    windows, _ = cli_w4_reference
    model = load_tiny(stories260k_path)
    eval_ids = windows[:4]
    with torch.no_grad():  # every window scores its seq_len - 1 predictions: the mean of the means
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in eval_ids]
    result = fabricq.quantize(model, windows, overrides=API_OVERRIDES, eval_ids=eval_ids)
    report = result.report
    assert report["ppl_before"] == pytest.approx(float(torch.tensor(losses).mean().exp()), rel=1e-5)
    assert report["ppl_after"] > report["ppl_before"]
    assert report["kl_after"] > 0 and 0 < report["kl_after_lower_bound"] < 10 * report["kl_after"]
    # The compact top-k reference (estimate ≠ its lower bound); full float16 rows would give equal ones.
    assert report["kl_after"] != report["kl_after_lower_bound"]


def test_api_with_a_fabric_and_dict_batches(cli_w4_reference, stories260k_path):
    """A launched Fabric's ranks (one here), and the windows given as a list of dicts: the same
    quantized weights as the tensor of windows without a Fabric."""
    from lightning.fabric import Fabric

    import fabricq

    windows, expected = cli_w4_reference
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    model = load_tiny(stories260k_path)
    batches = [{"input_ids": w[None]} for w in windows]
    result = fabricq.quantize(model, batches, overrides=API_OVERRIDES, fabric=fabric)
    assert sorted(result.quantized) == sorted(n[: -len(".weight_packed")] for n in expected if n.endswith("weight_packed"))
    got = {n: qw.dequantize() for n, qw in result.quantized.items()}
    plain = fabricq.quantize(load_tiny(stories260k_path), windows, overrides=API_OVERRIDES)
    assert all(torch.equal(got[n], qw.dequantize()) for n, qw in plain.quantized.items())


class RecordHessians(Callback):
    """Every layer's Hessians, without changing the layer."""

    needs_activations = True

    def __init__(self):
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}

    def on_layer_start(self, loop, index, layer):
        modules = {n: m for n, m in layer.named_modules(prefix=loop.layer_name(index)) if isinstance(m, nn.Linear)}
        self.hessians = SharedInputHessians(modules, torch.float64, stop_early=False, token_masks=loop.token_masks)

    def on_batch_end(self, loop, index, batch):
        self.hessians.end_batch()

    def on_layer_end(self, loop, index, layer):
        self.hessians.remove()
        for name in self.hessians.modules:
            acc = self.hessians.accumulators[self.hessians.leader[name]]
            self.sums[name] = (acc.sum.clone(), acc.tokens)
        return False


def _record(model, ids, mask=None, batch_size=2) -> dict:
    recorder = RecordHessians()
    CalibrationLoop(model, ids, device="cpu", batch_size=batch_size, callbacks=[recorder],
                    attention_mask=mask).run()
    return recorder.sums


def test_padding_does_not_change_the_hessians(stories260k_path):
    """Two sequences of 64 and 40 tokens, the short one right-padded to 64 with arbitrary tokens
    (mask 0), give every layer the Hessian sums of the two sequences calibrated separately."""
    model = load_tiny(stories260k_path).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(3, 500, (64,), generator=g), torch.randint(3, 500, (40,), generator=g)
    padded = torch.stack([a, torch.cat([b, torch.randint(3, 500, (24,), generator=g)])])
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    got = _record(model, padded, mask)
    alone_a, alone_b = _record(model, a[None], batch_size=1), _record(model, b[None], batch_size=1)
    assert len(got) == 35
    for name, (total, tokens) in got.items():
        assert tokens == 104, name
        expected = alone_a[name][0] + alone_b[name][0]
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    # Without the mask the padding would have counted: the check above can fail.
    unmasked = _record(model, padded)
    assert all(tokens == 128 for _, tokens in unmasked.values())


def test_masked_rows_are_left_out_of_a_shared_input_hessian():
    """Unit level: q/k/v-like modules sharing one input, two batches with padding, against x·xᵀ of
    the unpadded rows in float64."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 3)
    modules = {"q": shared, "k": nn.Linear(6, 5)}
    xs = [torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(1, 4, 6, dtype=torch.float64)]
    masks = [torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool(), torch.ones(1, 4, dtype=torch.bool)]
    hessians = SharedInputHessians({n: m.double() for n, m in modules.items()}, torch.float64, stop_early=False,
                                   token_masks=masks)
    for x in xs:
        modules["q"](x)
        modules["k"](x)
        hessians.end_batch()
    rows = torch.cat([x[m] for x, m in zip(xs, masks)])
    assert hessians.groups() == [["q", "k"]]
    torch.testing.assert_close(hessians.hessian("k"), rows.T @ rows / len(rows))
    assert hessians.accumulators["q"].tokens == 4 + 4


@pytest.mark.parametrize("kwargs, message", [
    ({"recipe": "gptq_w5"}, "recipe=gptq_w5: there is no such recipe"),
    ({"overrides": ["quant.bitz=3"]}, "unknown setting quant.bitz"),
    ({"overrides": ["quant.bits=5"]}, "quant.bits must be one of"),
    ({"overrides": "quant.bits=3"}, "overrides must be a list"),
    ({"calibration_ids": torch.rand(2, 8)}, "GPTQ needs token ids"),
    ({"calibration_ids": {"ids": torch.ones(2, 8, dtype=torch.long)}}, "a dict without input_ids"),
    ({"calibration_ids": [torch.ones(2, 8, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)]}, "different widths"),
])
def test_bad_input_is_one_error_before_any_weight_changes(stories260k_path, kwargs, message):
    import fabricq

    model = load_tiny(stories260k_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"calibration_ids": torch.ones(4, 16, dtype=torch.long), **kwargs}
    with pytest.raises(FabricqError, match=message):
        fabricq.quantize(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_decoder_layers_is_refused():
    import fabricq

    with pytest.raises(FabricqError, match="has no decoder layers"):
        fabricq.quantize(nn.Sequential(nn.Linear(4, 4)), torch.ones(2, 4, dtype=torch.long))


def test_a_failure_midway_restores_every_weight(stories260k_path, monkeypatch):
    import fabricq
    from fabricq.callbacks import solver

    model = load_tiny(stories260k_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    solve = solver.GroupQuantizer.solve

    def failing(self, names, weights, hessians):
        if any(".layers.3." in n for n in names):
            raise RuntimeError("injected failure")
        return solve(self, names, weights, hessians)

    monkeypatch.setattr(solver.GroupQuantizer, "solve", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        fabricq.quantize(model, torch.randint(3, 500, (4, 32)), overrides=["data.batch_size=2"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.setattr(solver.GroupQuantizer, "solve", solve)
    fabricq.quantize(model, torch.randint(3, 500, (4, 32)), overrides=["data.batch_size=2"])
    assert not torch.equal(before["model.layers.3.mlp.up_proj.weight"], model.model.layers[3].mlp.up_proj.weight)
