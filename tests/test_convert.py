"""`python -m fabricq.convert`: compressed-tensors ⇄ GPTQ without re-quantizing, checked with
the independent GPTQ decoder of test_gptq_format and compressed-tensors' own dequantizer; bad
input gives one `fabricq: error:` line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT
from fabricq.convert import convert
from fabricq.errors import FabricqError
from fabricq.checkpoint.compressed_tensors import save_compressed_checkpoint
from fabricq.checkpoint.gptq import save_gptq_checkpoint
from test_export import make_model
from test_gptq_format import decode_gptq, quantize, read_all


def run_convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fabricq.convert", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def compressed(tmp_path: Path, bits=4, group=64, symmetric=True, actorder="static", dtype=torch.bfloat16,
               name="ct") -> tuple:
    model = make_model(dtype, tie=True)
    # float16-exact scales that are also exact in the model's dtype (bfloat16 ⊂ float16 in range)
    quantized = quantize(model, bits, group, symmetric, actorder, scale_dtype=dtype if dtype != torch.float32
                         else torch.float16)
    out = tmp_path / name
    model.generation_config.save_pretrained(out)
    save_compressed_checkpoint(model, quantized, out)
    (out / "tokenizer_config.json").write_text("{}\n")
    return model, quantized, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_byte_identical_for_symmetric_int4(tmp_path, dtype):
    model, quantized, ct = compressed(tmp_path, dtype=dtype)
    gptq = convert(ct, tmp_path / "gptq", "gptq")
    back = convert(gptq, tmp_path / "back", "compressed-tensors")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (ct / name).read_bytes() == (back / name).read_bytes(), name
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in ct.iterdir())
    tensors = read_all(gptq)
    for name, qw in quantized.items():  # the GPTQ copy in between decodes to the same weights
        assert torch.equal(decode_gptq(tensors, name, 4, qw.shape[1]), qw.dequantize()), name
    assert oct(os.stat(gptq / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("bits, group", [(4, 32), (8, -1), (2, 32)])
def test_asymmetric_converts_both_ways_with_the_same_weights(tmp_path, bits, group):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    model, quantized, ct = compressed(tmp_path, bits, group, False, "none", torch.float32)
    gptq = convert(ct, tmp_path / "gptq", "gptq")
    tensors = read_all(gptq)
    for name, qw in quantized.items():
        assert torch.equal(decode_gptq(tensors, name, bits, qw.shape[1]), qw.dequantize()), name
    back = convert(gptq, tmp_path / "back", "compressed-tensors")
    dense = CompressedTensorsDequantizer(str(back), dtype=torch.float32).validate(read_all(back))
    for name, qw in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], qw.dequantize()), name


def test_gptq_dynamic_act_order_is_refused_for_compressed_tensors(tmp_path):
    model = make_model(torch.float32, tie=False)
    quantized = quantize(model, 4, 64, True, "dynamic")
    save_gptq_checkpoint(model, quantized, tmp_path / "gptq")
    with pytest.raises(FabricqError, match=r"model\.layers\.\d+\..*: its act-order groups .* refused by "
                                           "compressed-tensors"):
        convert(tmp_path / "gptq", tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_scales_not_exact_in_float16_are_refused(tmp_path):
    model = make_model(torch.float32, tie=False)
    quantized = quantize(model, 4, 64, True, "static", scale_dtype=torch.float32)
    save_compressed_checkpoint(model, quantized, tmp_path / "ct")
    with pytest.raises(FabricqError, match="not exactly representable in float16"):
        convert(tmp_path / "ct", tmp_path / "gptq", "gptq")
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # no staging left behind


def test_gptq_scales_not_exact_in_bfloat16_need_a_wider_dtype(tmp_path):
    model = make_model(torch.bfloat16, tie=False)
    quantized = quantize(model, 4, 64, True, "static", scale_dtype=torch.float16)
    save_gptq_checkpoint(model, quantized, tmp_path / "gptq")
    with pytest.raises(FabricqError, match="not exactly representable there"):
        convert(tmp_path / "gptq", tmp_path / "ct", "compressed-tensors")
    out = convert(tmp_path / "gptq", tmp_path / "ct", "compressed-tensors", dtype="float32")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return compressed(tmp_path_factory.mktemp("src"))[2]


def _copy(source: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, tmp_path / "bad"))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def convert_main(capsys, *args) -> subprocess.CompletedProcess:
    """`main()` in this process (the import of transformers costs seconds per subprocess)."""
    from fabricq.convert import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _check_refused(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabricq: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_non_empty_destination_needs_overwrite(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    _check_refused(run_convert(source, dst, "--to", "gptq"), "exists and is not empty", "--overwrite")
    assert (dst / "keep.txt").exists()
    done = run_convert(source, dst, "--to", "gptq", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert not (dst / "keep.txt").exists() and (dst / "quantize_config.json").exists()


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "truncated", "format", "mismatch", "already", "to"])
def test_bad_input(source, tmp_path, capsys, case):
    bad = _copy(source, tmp_path)
    module = "model.layers.1.mlp.up_proj"
    to, expected = "gptq", ()
    if case == "missing":
        _edit_tensors(bad, lambda t: t.pop(f"{module}.weight_scale"))
        expected = (f"missing tensor {module}.weight_scale",)
    elif case == "shape":
        _edit_tensors(bad, lambda t: t.update({f"{module}.weight_scale": t[f"{module}.weight_scale"][:, :1].clone()}))
        expected = (f"{module}.weight_scale has shape (128, 1), expected (128, 3)",)
    elif case == "dtype":
        _edit_tensors(bad, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
        expected = ("model.norm.weight is int32",)
    elif case == "truncated":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
        expected = ("corrupt or truncated safetensors file", "model.safetensors")
    elif case == "format":
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"]["quant_method"] = "awq"
        (bad / "config.json").write_text(json.dumps(config))
        expected = ("unknown format", "quant_method 'awq'")
    elif case == "mismatch":
        config = json.loads((bad / "config.json").read_text())
        config["intermediate_size"] = 192
        (bad / "config.json").write_text(json.dumps(config))
        expected = ("model.layers.0.mlp.down_proj",)
    elif case == "already":
        to, expected = "compressed-tensors", ("already in the compressed-tensors format",)
    elif case == "to":
        to, expected = "awq", ("--to must be one of",)
    _check_refused(convert_main(capsys, bad, tmp_path / "out", "--to", to), *expected)
    assert not (tmp_path / "out").exists()
