"""What fabricq.checkpoint.compressed_tensors writes, checked where test_export.py left mutants alive (see
benchmarks/results/2026-11-28-mutation-testing.md): the export dtype of the unquantized tensors and its check
on the scales, config.json's bytes, the group order and act-order of the quantization config,
targets of nested numbered modules, the shape checks, and the reader's class-name targets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_export import Case, make_model, quantize_model

from fabricq.checkpoint.compressed_tensors import (
    _targets_for,
    build_quantization_config,
    save_compressed_checkpoint,
    weights_for,
)
from fabricq.checkpoint.model import validate
from fabricq.quant.gptq import QuantizedWeight, rtn_quantize
from fabricq.quant.grid import QuantScheme


def small_model(dtype=torch.float32):
    model = make_model(dtype, tie=False)
    return model, quantize_model(model, Case(4, 32, True, "none", dtype, method="rtn"))


def test_export_dtype_converts_every_unquantized_tensor_and_the_scales(tmp_path):
    model = make_model(torch.float32, tie=False)
    quantized = {name: rtn_quantize(m.weight.data, QuantScheme(4, 32, True, "none"), scale_dtype=torch.bfloat16)
                 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    save_compressed_checkpoint(model, quantized, tmp_path / "a" / "b" / "out", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "a" / "b" / "out" / "model.safetensors")
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.to(torch.bfloat16))
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "a" / "b" / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_scales_not_representable_in_the_export_dtype_are_refused(tmp_path):
    model, quantized = small_model()  # float32 scales with full mantissas
    with pytest.raises(ValueError, match="scales are not representable in torch.bfloat16"):
        save_compressed_checkpoint(model, quantized, tmp_path / "out", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scales are not representable in torch.bfloat16"):
        validate(model, dict(model.named_modules()), quantized, scale_dtype=torch.bfloat16)
    assert not (tmp_path / "out").exists()


def test_config_json_has_sorted_keys(tmp_path):
    model, quantized = small_model()
    save_compressed_checkpoint(model, quantized, tmp_path / "out")
    text = (tmp_path / "out" / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def quantized_by_scheme(model, schemes: dict[str, QuantScheme]) -> dict:
    modules = dict(model.named_modules())
    return {name: rtn_quantize(modules[name].weight.data, s) for name, s in schemes.items()}


def test_largest_group_comes_first_and_dynamic_groups_say_group_actorder():
    model = make_model(torch.float32, tie=False)
    w4, w8 = QuantScheme(4, 32, True, "dynamic"), QuantScheme(8, -1, True, "static")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    schemes = {n: (w8 if n.endswith("down_proj") else w4) for n in names}
    config = build_quantization_config(model, quantized_by_scheme(model, schemes))
    groups = config["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    assert groups["group_0"]["weights"]["num_bits"] == 4 and groups["group_0"]["weights"]["actorder"] == "group"
    assert groups["group_1"]["weights"]["num_bits"] == 8 and groups["group_1"]["weights"]["actorder"] == "weight"
    assert groups["group_1"]["targets"] == ["re:.*\\.mlp\\.down_proj$"]
    assert groups["group_0"]["weights"]["strategy"] == "group" and groups["group_1"]["weights"]["strategy"] == "channel"
    # Equal sizes: ordered by the scheme (bits first), not by insertion.
    config = build_quantization_config(model, quantized_by_scheme(
        model, {names[0]: QuantScheme(8, -1, True, "static"), names[1]: QuantScheme(4, 32, True, "static")}))
    assert [g["weights"]["num_bits"] for g in config["config_groups"].values()] == [4, 8]


class Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList([Expert(), Expert()])


def test_nested_numbered_modules_get_one_target_per_expert():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block(), Block()])
    names = [f"layers.{i}.experts.{j}.proj" for i in range(2) for j in range(2)]
    assert _targets_for(model, names) == ["re:.*\\.experts\\.0\\.proj$", "re:.*\\.experts\\.1\\.proj$"]
    assert _targets_for(model, names[:3]) == ["re:.*\\.experts\\.0\\.proj$", "layers.0.experts.1.proj"]


def test_a_wrong_zero_point_shape_alone_is_refused():
    model, quantized = small_model()
    name, qw = next(iter(quantized.items()))
    bad = QuantizedWeight(qw.codes, qw.scale, qw.zero[:, :1], qw.g_idx, qw.scheme, qw.info)
    with pytest.raises(ValueError, match=f"{name}: scale/zero must be"):
        validate(model, dict(model.named_modules()), {name: bad})


def test_the_reader_accepts_one_class_name_target_only():
    weights = {"num_bits": 4}
    assert weights_for("model.layers.0.mlp.up_proj", {"g": {"targets": ["Linear"], "weights": weights}}) is weights
    two = {"a": {"targets": ["Linear"], "weights": weights}, "b": {"targets": ["Embedding"], "weights": {}}}
    with pytest.raises(ValueError, match="no config group of the checkpoint targets 'x'"):
        weights_for("x", two)


# -- the GPTQ format (fabricq.checkpoint.gptq) -----------------------------------------------------


def test_gptq_dynamic_entries_name_a_layer_suffix_or_one_exact_module():
    from types import SimpleNamespace

    from fabricq.checkpoint.gptq import build_gptq_config

    w4, w8 = QuantScheme(4, 32, True, "static"), QuantScheme(8, 32, True, "static")
    names = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "gate_proj", "down_proj")]
    every_down = {n: SimpleNamespace(scheme=w8 if n.endswith("down_proj") else w4) for n in names}
    config = build_gptq_config(every_down, names)
    assert config["bits"] == 4 and config["dynamic"] == {"+:.*\\.mlp\\.down_proj$": {"bits": 8}}
    one_down = {n: SimpleNamespace(scheme=w8 if n == "model.layers.1.mlp.down_proj" else w4) for n in names}
    assert build_gptq_config(one_down, names)["dynamic"] == {"+:^model\\.layers\\.1\\.mlp\\.down_proj$": {"bits": 8}}
    skipped = {n: SimpleNamespace(scheme=w4) for n in names[1:]}
    assert build_gptq_config(skipped, names)["dynamic"] == {"-:^model\\.layers\\.0\\.mlp\\.up_proj$": {}}


def test_gptq_checkpoint_config_files(tmp_path):
    from fabricq.checkpoint.gptq import save_gptq_checkpoint

    model = make_model(torch.float32, tie=False)
    quantized = {name: rtn_quantize(m.weight.data, QuantScheme(4, 32, True, "static"), scale_dtype=torch.float16)
                 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
    out = tmp_path / "a" / "b"
    save_gptq_checkpoint(model, quantized, out)
    for name in ("config.json", "quantize_config.json"):
        text = (out / name).read_text()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name
    config = json.loads((out / "config.json").read_text())
    assert "torch_dtype" not in config and config["quantization_config"]["quant_method"] == "gptq"
