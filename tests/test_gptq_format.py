"""The GPTQ-format writer, checked with a decoder written here from the format's description
(Python integers as bit streams; nothing from fabricq.quant.packing), and the export dtype
checked against transformers' loader.

Models: test_export's random Llama (hidden 96, intermediate 128: a requested group of 64 falls
back to 32 for modules reading the hidden state, so the GPTQ config needs per-module
overrides), and a 128/256 one whose shapes fill 3-bit words (32 codes in 3 int32 words).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from fabricq.errors import FabricqError
from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict
from fabricq.checkpoint.gptq import save_gptq_checkpoint
from fabricq.checkpoint.load import load_checkpoint
from fabricq.quant.gptq import QuantizedWeight, gptq_quantize, rtn_quantize
from fabricq.quant.grid import QuantScheme, effective_group_size
from fabricq.checkpoint.save import save_checkpoints
from test_export import byte_equal, logits, make_model, random_hessian

VOCAB = 128


def make_wide_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def quantize(model, bits, group, symmetric, actorder, scale_dtype=torch.float16, method="gptq"):
    """Every decoder Linear quantized in place, scales rounded to `scale_dtype`."""
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    quantized = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        scheme = QuantScheme(bits, effective_group_size(group, module.in_features), symmetric, actorder)
        if method == "rtn":
            qw = rtn_quantize(module.weight.data, scheme, scale_dtype=scale_dtype)
        else:
            qw = gptq_quantize(module.weight.data, random_hessian(module.in_features, generator), scheme,
                               scale_dtype=scale_dtype, block_size=32, name=name)
        with torch.no_grad():
            module.weight.copy_(qw.dequantize().to(dtype))
        quantized[name] = qw
    return quantized


# ---------------------------------------------------------------------------------------------
# The independent decoder
# ---------------------------------------------------------------------------------------------


def column_stream(words: torch.Tensor) -> int:
    """One column of int32 words as a single integer, word k at bits [32k, 32k+32)."""
    stream = 0
    for k, w in enumerate(words.tolist()):
        stream |= (w & 0xFFFFFFFF) << (32 * k)
    return stream


def unpack_columns(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """packed (words, columns) → (count, columns) unsigned values, value i of a column at bits
    [bits·i, bits·(i+1)) of its stream."""
    mask = (1 << bits) - 1
    out = torch.empty(count, packed.shape[1], dtype=torch.int64)
    for c in range(packed.shape[1]):
        stream = column_stream(packed[:, c])
        out[:, c] = torch.tensor([(stream >> (bits * i)) & mask for i in range(count)])
    return out


def decode_gptq(tensors: dict, name: str, bits: int, in_features: int) -> torch.Tensor:
    """W[o, i] = scales[g, o] · (q[i, o] - (qzeros[g, o] + 1)) with g = g_idx[i] (float32)."""
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"].long()
    assert qweight.dtype == qzeros.dtype == torch.int32
    out_features = scales.shape[1]
    q = unpack_columns(qweight, bits, in_features)  # (in, out)
    z = unpack_columns(qzeros.T.contiguous(), bits, out_features).T + 1  # (groups, out)
    w = (q - z[g_idx]).float() * scales.float()[g_idx]
    return w.T.contiguous()


def dynamic_override(qconfig: dict, name: str) -> dict | None:
    """GPTQModel's per-module override: the first `dynamic` pattern matching (re.match) the
    module name; None for a module excluded with "-:"."""
    fields = {k: qconfig[k] for k in ("bits", "group_size", "sym", "desc_act")}
    for pattern, override in qconfig.get("dynamic", {}).items():
        sign, regex = pattern[0], pattern[2:]
        if re.match(regex, name):
            return None if sign == "-" else {**fields, **override}
    return fields


def read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


CASES = {
    "w4-g64-sym-static": (make_model, 4, 64, True, "static"),
    "w4-g32-asym-none": (make_model, 4, 32, False, "none"),
    "w8-ch-sym-static": (make_model, 8, -1, True, "static"),
    "w4-ch-asym-static": (make_model, 4, -1, False, "static"),
    "w2-g32-asym-none": (make_model, 2, 32, False, "none"),
    "w4-g64-sym-dynamic": (make_model, 4, 64, True, "dynamic"),
    "w3-g64-sym-static": (make_wide_model, 3, 64, True, "static"),
    "w3-g32-asym-dynamic": (make_wide_model, 3, 32, False, "dynamic"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def build(case_id):
        if case_id not in cache:
            factory, bits, group, sym, actorder = CASES[case_id]
            model = factory(torch.float32) if factory is make_wide_model else factory(torch.float32, False)
            quantized = quantize(model, bits, group, sym, actorder)
            out = tmp_path_factory.mktemp(case_id)
            save_gptq_checkpoint(model, quantized, out)
            cache[case_id] = (model, quantized, out)
        return cache[case_id]

    return build


@pytest.mark.parametrize("case_id", list(CASES))
def test_independent_decoder_gives_fabricqs_weights(built, case_id):
    model, quantized, out = built(case_id)
    _, bits, group, sym, actorder = CASES[case_id]
    tensors = read_all(out)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    for name, qw in quantized.items():
        rows, cols = qw.shape
        fields = dynamic_override(qconfig, name)
        assert fields == {"bits": bits, "group_size": qw.scheme.group_size, "sym": sym,
                          "desc_act": actorder == "dynamic"}, name
        groups = qw.scheme.groups_for(cols)
        assert tensors[f"{name}.qweight"].dtype == torch.int32
        assert tensors[f"{name}.qweight"].shape == (cols * bits // 32, rows)
        assert tensors[f"{name}.qzeros"].shape == (groups, rows * bits // 32)
        assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.scales"].shape == (groups, rows)
        assert tensors[f"{name}.g_idx"].dtype == torch.int32
        assert torch.equal(decode_gptq(tensors, name, bits, cols), qw.dequantize()), name
        if sym:  # the symmetric grid's zero point is 2^(b-1), stored minus one
            z = unpack_columns(tensors[f"{name}.qzeros"].T.contiguous(), bits, rows)
            assert bool((z == (1 << (bits - 1)) - 1).all())
    if actorder == "dynamic":
        assert any(not torch.equal(qw.g_idx, qw.g_idx.sort().values) for qw in quantized.values())
    # fabricq's own reader agrees, codes included
    checkpoint = load_checkpoint(out)
    assert checkpoint.fmt == "gptq" and checkpoint.quantized.keys() == quantized.keys()
    for name, qw in quantized.items():
        got = checkpoint.quantized[name]
        assert got.scheme == qw.scheme, name
        assert torch.equal(got.dequantize(), qw.dequantize()), name
        if sym:
            assert torch.equal(got.codes, qw.codes) and torch.equal(got.zero, qw.zero)


def test_config_and_quantize_config(built):
    from transformers import GPTQConfig

    model, quantized, out = built("w4-g64-sym-static")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert json.loads((out / "quantize_config.json").read_text()) == q
    assert {k: q[k] for k in ("quant_method", "checkpoint_format", "bits", "sym", "desc_act", "lm_head")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "sym": True, "desc_act": False,
        "lm_head": False}
    # hidden-size modules fall back to group 32, down_proj keeps 64: the majority is the base
    assert q["group_size"] == 32 and q["dynamic"] == {r"+:.*\.mlp\.down_proj$": {"group_size": 64}}
    assert q["meta"]["fabricq_actorder"] == "static"
    assert config["dtype"] == "float32"
    parsed = GPTQConfig.from_dict(dict(q))  # transformers reads the dict it expects
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym, parsed.format) == (4, 32, False, True, "gptq")
    mode = os.stat(out / "model.safetensors").st_mode
    assert mode & 0o044 == 0o044 & ~_umask(), oct(mode)  # readable by group/others as the umask allows


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unquantized_tensors_and_bias_are_stored_as_held(tmp_path):
    model = make_model(torch.float32, False)
    with torch.no_grad():  # a bias, as Qwen2's q/k/v have
        proj = model.model.layers[0].self_attn.q_proj
        proj.bias = torch.nn.Parameter(torch.randn(proj.out_features))
    quantized = quantize(model, 4, 32, True, "static")
    save_gptq_checkpoint(model, quantized, tmp_path, dtype=torch.bfloat16)
    tensors = read_all(tmp_path)
    assert byte_equal(tensors["model.layers.0.self_attn.q_proj.bias"], proj.bias.detach().to(torch.bfloat16))
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") not in quantized:
            assert byte_equal(tensors[key], value.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_zero_point_zero_is_lifted_or_refused(tmp_path):
    """v1 stores z - 1: a group with z = 0 is stored as codes + 1, z = 1 while no code is the top
    one (an all-zero row), and refused otherwise."""
    model = make_model(torch.float32, False)
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    with torch.no_grad():
        module.weight[3] = 0
        module.weight[5] = module.weight[5].abs()
    scheme = QuantScheme(4, 32, False, "none")
    qw = rtn_quantize(module.weight.data, scheme, scale_dtype=torch.float16)
    assert bool((qw.zero[3] == scheme.qmin).all()) and bool((qw.zero[5] == scheme.qmin).all())
    lifted = QuantizedWeight(qw.codes.clone(), qw.scale, qw.zero.clone(), qw.g_idx, scheme)
    lifted.zero[5] = qw.zero[4]  # keep only the all-zero row at z = 0
    lifted.codes[5] = qw.codes[4]
    save_gptq_checkpoint(model, {name: lifted}, tmp_path / "ok")
    decoded = decode_gptq(read_all(tmp_path / "ok"), name, 4, module.in_features)
    assert torch.equal(decoded, lifted.dequantize())
    assert bool((decoded[3] == 0).all())
    with pytest.raises(FabricqError, match=f"{name}: a group has zero point 0 and uses the top code"):
        save_gptq_checkpoint(model, {name: qw}, tmp_path / "refused")


def test_refuses_what_the_format_cannot_hold(tmp_path):
    model = make_model(torch.float32, False)  # k_proj has 48 outputs: not whole 3-bit words
    name = "model.layers.0.self_attn.k_proj"
    weight = model.get_submodule(name).weight.data
    qw = rtn_quantize(weight, QuantScheme(3, 32, True, "none"), scale_dtype=torch.float16)
    with pytest.raises(FabricqError, match=r"k_proj: the GPTQ format packs 32 3-bit codes per 3 words"):
        save_gptq_checkpoint(model, {name: qw}, tmp_path)
    qw = rtn_quantize(weight, QuantScheme(4, 32, True, "none"), scale_dtype=torch.float32)
    with pytest.raises((FabricqError, ValueError), match="not representable in torch.float16|float16"):
        save_gptq_checkpoint(model, {name: qw}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Export dispatch (export.format, export.dtype) as a run does it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["auto", "float16", "bfloat16", "float32"])
def test_export_dtype_loads_in_transformers_with_the_same_logits(tmp_path, dtype):
    """A float32 model exported as `dtype` (auto → bfloat16) with format=both: transformers loads
    the compressed-tensors copy in that dtype with the logits of fabricq's dequantized model in it,
    and the GPTQ copy decodes to the same weights."""
    from fabricq.checkpoint.engines import resolve_export_dtype, scale_dtype_for

    model = make_model(torch.float32, tie=True)
    export = OmegaConf.create({"format": "both", "dtype": dtype, "engine": "none", "tp": 1})
    target = resolve_export_dtype(dtype, torch.float32)
    assert target == (torch.bfloat16 if dtype == "auto" else getattr(torch, dtype))
    quantized = quantize(model, 4, 32, True, "static", scale_dtype=scale_dtype_for("both", target))
    save_checkpoints(model, quantized, tmp_path, None, export)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(target).removeprefix("torch.")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    got = logits(loaded, ids)
    assert got.dtype == target
    reference = make_model(target, tie=True)  # fabricq's reader, loaded into the same architecture
    reference.load_state_dict(load_dequantized_state_dict(tmp_path), strict=False)
    torch.testing.assert_close(got, logits(reference, ids), rtol=0, atol=1e-5 if target == torch.float32 else 1e-2)
    # ...and near the float32 model that calibration held (bfloat16 rounds the activations)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[target]
    torch.testing.assert_close(got.float(), logits(model, ids), rtol=0, atol=tolerance)
    gptq = read_all(tmp_path / "gptq")
    for name, qw in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize().to(target)), name
        assert torch.equal(decode_gptq(gptq, name, 4, qw.shape[1]), qw.dequantize()), name


# GPTQModel (a real GPTQ loader) wants a newer torch than fabricq pins, so it lives in a
# virtualenv of its own that sees this one's packages; the test runs it as a subprocess:
#   python -m venv --system-site-packages VENV
#   VENV/bin/python -m pip install -r <its requirements.txt without torch> -c <(echo torch==2.13.0)
#   VENV/bin/python -m pip install --no-deps --no-build-isolation gptqmodel-7.7.0.tar.gz
#   FABRICQ_GPTQMODEL_PYTHON=VENV/bin/python pytest tests/test_gptq_format.py
GPTQMODEL_PROBE = """
import json, sys, torch
from safetensors.torch import save_file
from gptqmodel import BACKEND, GPTQModel
for ckpt in sys.argv[1:]:
    dtype = getattr(torch, json.load(open(ckpt + "/config.json"))["dtype"])
    try:  # the plain torch kernel: it can dequantize every module for the comparison
        model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=dtype).model
    except ValueError as err:
        open(ckpt + "/refused.txt", "w").write(str(err))
        continue
    out = {f"{n}.weight": m.dequantize_weight().T.float().contiguous()
           for n, m in model.named_modules() if hasattr(m, "qweight")}
    with torch.no_grad():
        out["logits"] = model(torch.arange(3, 10).view(1, 7)).logits.float().contiguous()
    save_file(out, ckpt + "/gptqmodel.safetensors")
"""
REAL_LOADER_CASES = [  # (model factory, dtype, bits, group, symmetric, actorder)
    (make_wide_model, torch.bfloat16, 4, 32, True, "static"),
    (make_wide_model, torch.bfloat16, 3, 64, True, "static"),
    (make_wide_model, torch.bfloat16, 4, 32, True, "dynamic"),
    (make_wide_model, torch.float16, 8, -1, True, "static"),
    (make_model, torch.float16, 2, 64, True, "none"),  # group 32 and 64 modules: `dynamic` overrides
    (make_wide_model, torch.bfloat16, 4, 32, False, "none"),
]


def word_tokenizer():
    """GPTQModel.load wants a tokenizer beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_gptqmodel_loads_the_export_with_fabricqs_weights(tmp_path):
    """GPTQModel 7.7 reads every scheme fabricq writes to exactly fabricq's weights (in the model's
    dtype) and the same logits; it refuses asymmetric v1 checkpoints it did not write itself, as
    `fabricq.inspect` tells."""
    import subprocess

    python = os.environ.get("FABRICQ_GPTQMODEL_PYTHON")
    if not python:
        pytest.skip("FABRICQ_GPTQMODEL_PYTHON (a python with GPTQModel, see the comment above) is not set")
    cases = []
    for i, (factory, dtype, bits, group, sym, actorder) in enumerate(REAL_LOADER_CASES):
        model = factory(dtype) if factory is make_wide_model else factory(dtype, False)
        quantized = quantize(model, bits, group, sym, actorder, scale_dtype=dtype)
        save_gptq_checkpoint(model, quantized, tmp_path / str(i), word_tokenizer())
        cases.append((model, quantized, tmp_path / str(i)))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([python, "-c", GPTQMODEL_PROBE, *(str(c[2]) for c in cases)], env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    for (model, quantized, out), (_, dtype, _, _, sym, _) in zip(cases, REAL_LOADER_CASES):
        if not sym:
            assert "sym=False" in (out / "refused.txt").read_text()
            continue
        got = load_file(out / "gptqmodel.safetensors")
        for name, qw in quantized.items():
            assert torch.equal(got[f"{name}.weight"], qw.dequantize().to(dtype).float()), (out, name)
        want = logits(model, torch.arange(3, 10).view(1, 7)).float()
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-2)
