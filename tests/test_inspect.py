"""`python -m fabricq.inspect` and the pre-flight check: the report's numbers against the files,
each engine rule against the arithmetic it states, and the same rules refusing a config before
calibration (on the tiny real model in ../shared)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO_ROOT, run_cli
from fabricq.errors import FabricqError
from fabricq.checkpoint.compressed_tensors import save_compressed_checkpoint
from fabricq.checkpoint.gptq import save_gptq_checkpoint
from fabricq.checkpoint.report import inspect_checkpoint
from fabricq.inspect import main
from fabricq.quant.grid import QuantScheme
from fabricq.checkpoint.engines import ModuleSpec, check_export_config, engine_verdict, preflight
from test_export import HIDDEN, INTERMEDIATE, make_model
from test_gptq_format import quantize

SMALL = ["data.num_samples=8", "data.seq_len=64", "data.batch_size=4", "eval.seq_len=64", "eval.max_windows=4"]


def export_cfg(**fields):
    return OmegaConf.create({"format": "compressed-tensors", "dtype": "auto", "engine": "none", "tp": 1, **fields})


def checkpoint(tmp_path, bits=4, group=64, symmetric=True, dtype=torch.bfloat16, fmt="compressed-tensors",
               name="ckpt"):
    model = make_model(dtype, tie=True)
    quantized = quantize(model, bits, group, symmetric, "static",
                         scale_dtype=torch.float16 if dtype == torch.float32 else dtype)
    out = tmp_path / name
    (save_compressed_checkpoint if fmt == "compressed-tensors" else save_gptq_checkpoint)(model, quantized, out)
    return model, quantized, out


def test_report_numbers(tmp_path):
    model, quantized, out = checkpoint(tmp_path)
    report = inspect_checkpoint(out)
    assert report["format"] == "compressed-tensors" and report["dtype"] == "bfloat16"
    assert report["quantized_modules"] == 14 and report["unquantized_linear"] == ["lm_head"]
    by_module = {s["modules"]: s for s in report["schemes"]}
    assert by_module["mlp.down_proj"] == {"modules": "mlp.down_proj", "count": 2, "bits": 4, "symmetric": True,
                                          "group_size": 64, "actorder": "static"}
    assert {s["group_size"] for m, s in by_module.items() if m != "mlp.down_proj"} == {32}
    assert report["size_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    assert report["tensors_checked"] == len(load_file(out / "model.safetensors"))
    # tied lm_head counted once, every parameter in bfloat16
    assert report["unquantized_bytes"] == 2 * sum(p.numel() for p in model.parameters())
    assert report["ratio"] == pytest.approx(report["size_bytes"] / report["unquantized_bytes"])
    assert report["ratio"] < 0.6


def _spec(name, out, inp, bits=4, group=128, symmetric=True, actorder="static"):
    return ModuleSpec(name, out, inp, bits, group, symmetric, actorder)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_row_parallel_shard_must_hold_whole_groups(tp, group):
    """o_proj/down_proj are split by input columns: in/tp must be whole and a multiple of the group
    size; q_proj (column-parallel) is split by output rows instead."""
    inp = 1536
    specs = [_spec("model.layers.0.mlp.down_proj", 576, inp, group=group),
             _spec("model.layers.0.self_attn.q_proj", 1536, 576, group=64)]
    verdict = engine_verdict("vllm", "compressed-tensors", specs, torch.bfloat16, tp)
    fails = [r for r in verdict.reasons if r.startswith("[fails]")]
    shard_ok = inp % tp == 0 and (inp // tp) % group == 0
    assert (verdict.level == "fails") == (not shard_ok), verdict.reasons
    if not shard_ok:
        assert all("mlp.down_proj" in r for r in fails)
        assert f"group size {group} does not divide the tensor-parallel shard {inp}/{tp}={inp // tp}" in fails[0]


@pytest.mark.parametrize("bits, symmetric, fmt, level", [
    (4, True, "compressed-tensors", "ok"), (8, True, "compressed-tensors", "ok"),
    (4, False, "compressed-tensors", "ok"), (8, False, "compressed-tensors", "fails"),
    (3, True, "compressed-tensors", "fails"), (2, False, "compressed-tensors", "fails"),
    (3, False, "gptq", "warn"), (4, False, "gptq", "warn"), (4, True, "gptq", "ok"),
])
def test_vllm_bits_and_symmetry(bits, symmetric, fmt, level):
    spec = _spec("model.layers.0.mlp.up_proj", 1536, 1024, bits=bits, symmetric=symmetric)
    verdict = engine_verdict("vllm", fmt, [spec], torch.bfloat16)
    assert verdict.level == level, verdict.reasons


def test_transformers_rules():
    asym = _spec("model.layers.0.mlp.up_proj", 1536, 1024, symmetric=False)
    verdict = engine_verdict("transformers", "gptq", [asym], torch.bfloat16)
    assert verdict.level == "fails" and "refuses sym=false checkpoints" in verdict.reasons[0]
    verdict = engine_verdict("transformers", "compressed-tensors", [asym], torch.bfloat16)
    assert verdict.level == "warn" and "dequantize=True" in verdict.reasons[0]
    dynamic = _spec("model.layers.0.mlp.up_proj", 1536, 1024, actorder="dynamic")
    assert engine_verdict("transformers", "compressed-tensors", [dynamic], torch.bfloat16).level == "fails"
    assert engine_verdict("transformers", "gptq", [dynamic], torch.bfloat16).level == "warn"


def test_float32_checkpoint_and_mixed_gptq_groups(tmp_path):
    _, _, out = checkpoint(tmp_path, dtype=torch.float32, fmt="gptq")
    report = inspect_checkpoint(out, ["vllm", "tgi", "transformers"])
    vllm, tgi, transformers = report["verdicts"]
    assert report["dtype"] == "float32" and report["format"] == "gptq"
    assert any("float32 checkpoint" in r for r in vllm.reasons) and vllm.level == "warn"
    assert tgi.level == "fails" and any("group sizes [32, 64] differ per module" in r for r in tgi.reasons)
    assert transformers.level == "warn" and any("gptqmodel" in r for r in transformers.reasons)


def test_cli_report_exit_codes_and_bad_input(tmp_path, capsys):
    _, _, good = checkpoint(tmp_path, name="good")
    assert main([str(good), "--engine", "vllm"]) == 0
    text = capsys.readouterr().out
    assert "format: compressed-tensors    dtype: bfloat16" in text and "mlp.down_proj (2): 4-bit sym, group 64" in text
    assert main([str(good), "--engine", "vllm", "--tp", "2"]) == 1  # 96/2 = 48 columns: not whole groups of 32
    assert "[fails] self_attn.o_proj (2 modules): group size 32 does not divide" in capsys.readouterr().out
    assert main([str(good), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [v["engine"] for v in parsed["verdicts"]] == ["vllm", "tgi", "transformers"]
    _, _, three = checkpoint(tmp_path, bits=3, name="three")
    assert main([str(three), "--engine", "vllm"]) == 1
    assert "3-bit weights: vLLM's compressed-tensors W4A16/W8A16 kernels take 4 or 8 bits" in capsys.readouterr().out
    (good / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:-64])
    assert main([str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fabricq: error: corrupt or truncated safetensors file")


def test_cli_as_a_command(tmp_path):
    _, _, out = checkpoint(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fabricq.inspect", str(out), "--engine", "transformers"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "transformers (compressed-tensors): ok" in result.stdout


# ---------------------------------------------------------------------------------------------
# Pre-flight on a config
# ---------------------------------------------------------------------------------------------


def test_dynamic_act_order_refused_for_compressed_tensors_only():
    quant = OmegaConf.create({"actorder": "dynamic"})
    for fmt in ("compressed-tensors", "both"):
        with pytest.raises(FabricqError, match="quant.actorder=dynamic .* compressed-tensors >= 0.19 refuses .* "
                                               "use quant.actorder=static"):
            check_export_config(export_cfg(format=fmt), quant)
    check_export_config(export_cfg(format="gptq"), quant)
    check_export_config(export_cfg(), OmegaConf.create({"actorder": "static"}))


def test_dynamic_act_order_is_what_compressed_tensors_refuses():
    """The reason of the refusal above, on the installed compressed-tensors."""
    from compressed_tensors.quantization import QuantizationArgs

    with pytest.raises(ValueError, match="actorder"):
        QuantizationArgs(num_bits=4, strategy="group", group_size=64, actorder="group")


SHAPES = {f"model.layers.{i}.{m}": shape for i in range(2) for m, shape in {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (48, HIDDEN), "self_attn.v_proj": (48, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE)}.items()}


def test_preflight_rules():
    scheme = QuantScheme(4, 64, True, "static")
    assert preflight(export_cfg(), scheme, SHAPES, torch.float32) == []  # engine none: no verdict, no error
    verdicts = preflight(export_cfg(engine="vllm"), scheme, SHAPES, torch.float32)
    assert [v.level for v in verdicts] == ["warn"]  # shards below Marlin's tile
    with pytest.raises(FabricqError, match=r"export.engine=vllm export.tp=2 cannot serve .*self_attn.o_proj"):
        preflight(export_cfg(engine="vllm", tp=2), scheme, SHAPES, torch.float32)
    with pytest.raises(FabricqError, match="asymmetric 8-bit"):
        preflight(export_cfg(engine="vllm"), QuantScheme(8, -1, False, "static"), SHAPES, torch.float32)
    # with both formats, one servable format is enough (vLLM serves asymmetric 8-bit GPTQ on its GPTQ kernel)
    both = preflight(export_cfg(engine="vllm", format="both"), QuantScheme(8, -1, False, "static"), SHAPES,
                     torch.bfloat16)
    assert [(v.fmt, v.level) for v in both] == [("compressed-tensors", "fails"), ("gptq", "warn")]
    # the GPTQ format cannot pack 48 outputs into 3-bit words (32 codes per 3 words) whatever the engine
    with pytest.raises(FabricqError, match=r"export.format=gptq cannot store model.layers.0.self_attn.k_proj"):
        preflight(export_cfg(format="gptq"), QuantScheme(3, 64, True, "static"), SHAPES, torch.float32)
    preflight(export_cfg(format="gptq"), QuantScheme(3, 64, True, "static"), SHAPES, torch.float32,
              ignore=(r"k_proj|v_proj",))


@pytest.mark.parametrize("args, message", [
    (["export.engine=vllm", "quant.bits=3"], "export.engine=vllm export.tp=1 cannot serve this config"),
    (["quant.actorder=dynamic"], "quant.actorder=dynamic stores act-order groups"),
    (["export.format=gptq"], "export.format=gptq cannot store model.layers.0.mlp.gate_proj"),
])
def test_run_refuses_before_calibration(shared_path, tmp_path, args, message):
    model = shared_path("models", "stories260k")
    result = run_cli("+recipe=gptq_w4", f"model.path={model}", f"output_dir={tmp_path / 'out'}", *SMALL, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Perplexity before" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_run_writes_both_formats_in_bfloat16(shared_path, tmp_path):
    """The default dtype of a float32 model is bfloat16; `both` puts the GPTQ copy in gptq/; the
    two copies hold the same weights; inspect reads both."""
    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict
    from fabricq.checkpoint.load import load_dequantized_gptq_state_dict
    from fabricq.checkpoint.load import load_checkpoint

    model = shared_path("models", "stories260k")  # intermediate 172: not whole GPTQ words, so mlp stays dense
    out = tmp_path / "out"
    result = run_cli("+recipe=gptq_w4", f"model.path={model}", f"output_dir={out}", *SMALL, "export.format=both",
                     "quant.ignore=[mlp]", "export.engine=transformers")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["export"] == {"formats": [".", "gptq"], "dtype": "bfloat16"}
    ct, gptq = load_checkpoint(out), load_checkpoint(out / "gptq")
    assert ct.fmt == "compressed-tensors" and gptq.fmt == "gptq"
    assert ct.quantized.keys() == gptq.quantized.keys() and len(ct.quantized) == 5 * 4
    dense, dense_gptq = load_dequantized_state_dict(out), load_dequantized_gptq_state_dict(out / "gptq")
    for name in gptq.quantized:
        assert torch.equal(dense_gptq[f"{name}.weight"].to(torch.bfloat16), dense[f"{name}.weight"]), name
    assert dense["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "gptq" / "tokenizer.json").exists()
