"""The checkpoint writer, checked against loaders that are not ours: compressed-tensors'
model-free dequantizer and transformers' `from_pretrained`.

The model is a 2-layer random Llama with hidden size 96 and intermediate size 128, so a requested
group of 64 falls back to 32 for every module reading the hidden state (96 columns) and stays 64
for down_proj (128 columns): the checkpoint needs two config groups whose targets must split the
modules exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict, save_compressed_checkpoint
from fabricq.quant.gptq import gptq_quantize, rtn_quantize
from fabricq.quant.grid import QuantScheme, effective_group_size

HIDDEN, INTERMEDIATE, VOCAB = 96, 128, 128


@dataclass(frozen=True)
class Case:
    bits: int
    group: int
    symmetric: bool
    actorder: str
    dtype: torch.dtype = torch.float32
    tie: bool = False
    method: str = "gptq"

    @property
    def id(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        group = "ch" if self.group == -1 else f"g{self.group}"
        dtype = str(self.dtype).removeprefix("torch.")
        tie = "-tied" if self.tie else ""
        return f"w{self.bits}{group}-{sym}-{self.actorder}-{self.method}-{dtype}{tie}"

    @property
    def mixed_groups(self) -> bool:
        return len({effective_group_size(self.group, c) for c in (HIDDEN, INTERMEDIATE)}) > 1


CASES = [
    Case(4, 64, True, "static", tie=True),
    Case(4, 64, False, "none"),
    Case(4, 64, True, "static", torch.bfloat16, tie=True),
    Case(8, -1, True, "static", torch.bfloat16),
    Case(8, 32, False, "static"),
    Case(4, 32, False, "none", torch.bfloat16, tie=True),
    Case(3, 64, True, "static"),
    Case(3, -1, False, "none", method="rtn"),
    Case(2, 32, False, "none", method="rtn"),
    Case(2, 64, True, "static"),
]
STATIC_CASES = {c.id: c for c in CASES}
DYNAMIC_CASES = {
    c.id: c
    for c in [Case(4, 64, True, "dynamic"), Case(4, 64, False, "dynamic", torch.bfloat16, tie=True)]
}


def make_model(dtype: torch.dtype, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    # from_config keeps the rotary buffers in float32 like from_pretrained does (`.to(dtype)`
    # would cast them too and make logits differ from any loaded model for reasons of our own).
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # norms are ones at init: make them carry information
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def random_hessian(columns: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * columns, columns, generator=generator)
    x = x * torch.rand(columns, generator=generator).mul(3).add(0.1)  # uneven diagonal: act-order matters
    return x.T @ x / x.shape[0]


def quantize_model(model, case: Case, skip: tuple[str, ...] = ()) -> dict:
    """Quantize every Linear of the decoder layers in place (weights ← dequantized)."""
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    quantized = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name) or name in skip:
            continue
        columns = module.in_features
        scheme = QuantScheme(case.bits, effective_group_size(case.group, columns), case.symmetric, case.actorder)
        if case.method == "rtn":
            qw = rtn_quantize(module.weight.data, scheme, scale_dtype=dtype)
        else:
            hessian = random_hessian(columns, generator)
            qw = gptq_quantize(module.weight.data, hessian, scheme, scale_dtype=dtype, block_size=32, name=name)
        with torch.no_grad():
            module.weight.copy_(qw.dequantize().to(dtype))
        quantized[name] = qw
    return quantized


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """case → (model, quantized, checkpoint dir), built once per module."""

    def _build(case: Case):
        if case.id not in _BUILT:
            model = make_model(case.dtype, case.tie)
            quantized = quantize_model(model, case)
            out = tmp_path_factory.mktemp(case.id)
            save_compressed_checkpoint(model, quantized, out)
            _BUILT[case.id] = (model, quantized, out)
        return _BUILT[case.id]

    return _build


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def expected_weight(qw, dtype) -> torch.Tensor:
    return qw.dequantize().to(dtype)


def byte_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------
# 1. compressed-tensors decompresses the checkpoint to exactly fabricq's weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", list(STATIC_CASES))
def test_compressed_tensors_dequantizer_reproduces_weights(build, case_id):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    case = STATIC_CASES[case_id]
    model, quantized, out = build(case)
    dequantizer = CompressedTensorsDequantizer(str(out), dtype=case.dtype)
    # `validate` also fails on compression params left over by modules no config group targets.
    dense = dequantizer.validate(read_checkpoint(out))
    for name, qw in quantized.items():
        got = dense[f"{name}.weight"]
        assert got.dtype == case.dtype
        assert torch.equal(got, expected_weight(qw, case.dtype)), name
        if case.dtype == torch.float32:
            assert torch.equal(got, qw.dequantize()), name
    # ...and fabricq's own reader agrees bit for bit on everything.
    ours = load_dequantized_state_dict(out)
    assert ours.keys() == dense.keys()
    for key in ours:
        assert byte_equal(ours[key], dense[key]), key


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.mixed_groups][:2])
def test_targets_select_each_module_with_its_own_scheme(build, case_id):
    """compressed-tensors' own matching assigns each module the scheme it was quantized with."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules

    model, quantized, out = build(STATIC_CASES[case_id])
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qconfig)
    assert len(config.config_groups) == 2
    assert all(t.startswith("re:") for g in config.config_groups.values() for t in g.targets)
    assigned = {}
    for scheme in config.config_groups.values():
        for name, _ in match_named_modules(model, scheme.targets, config.ignore):
            assert name not in assigned, f"{name} matched by two groups"
            assigned[name] = scheme.weights
    assert assigned.keys() == quantized.keys()
    for name, args in assigned.items():
        s = quantized[name].scheme
        assert (args.num_bits, args.symmetric) == (s.bits, s.symmetric)
        assert args.strategy == ("channel" if s.group_size == -1 else "group")
        if s.group_size != -1:
            assert args.group_size == s.group_size
    assert {quantized[n].scheme.group_size for n in quantized if n.endswith("down_proj")} == {64}
    assert {quantized[n].scheme.group_size for n in quantized if n.endswith("q_proj")} == {32}


def test_config_schema(build):
    case = CASES[0]
    model, quantized, out = build(case)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed"
    assert q["ignore"] == ["lm_head"]
    for group in q["config_groups"].values():
        w = group["weights"]
        assert w["type"] == "int" and w["num_bits"] == 4 and w["symmetric"] is True
        assert w["strategy"] == "group" and w["actorder"] == "weight"
        assert w["observer"] == "minmax" and w["dynamic"] is False
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    assert config["num_hidden_layers"] == 2


def test_partially_quantized_model_uses_exact_names_and_ignore(tmp_path):
    """When a suffix regex would also catch a module left unquantized, targets fall back to
    exact names and the skipped module is listed in `ignore`."""
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    case = Case(4, 64, True, "static")
    model = make_model(case.dtype, case.tie, seed=3)
    skipped = "model.layers.1.self_attn.q_proj"
    original = model.get_submodule(skipped).weight.detach().clone()
    quantized = quantize_model(model, case, skip=(skipped,))
    save_compressed_checkpoint(model, quantized, tmp_path, ignore=["re:.*vision.*"])
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    targets = [t for g in q["config_groups"].values() for t in g["targets"]]
    assert "model.layers.0.self_attn.q_proj" in targets
    assert not any("q_proj" in t and t.startswith("re:") for t in targets)
    assert q["ignore"] == ["re:.*vision.*", skipped, "lm_head"]
    dense = CompressedTensorsDequantizer(str(tmp_path), dtype=torch.float32).validate(read_checkpoint(tmp_path))
    assert torch.equal(dense[f"{skipped}.weight"], original)
    for name, qw in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], qw.dequantize())


# ---------------------------------------------------------------------------------------------
# 2. transformers loads the checkpoint and computes the same logits
# ---------------------------------------------------------------------------------------------


def transformers_load(path, case: Case):
    """The recipe that works with transformers 5 / compressed-tensors 0.20 on CPU.

    Symmetric: plain `from_pretrained`; the packed weights are decompressed (per module, with
    each module's own config group) by a hook on the first forward pass.
    Asymmetric: that path rejects the packed zero points (compressed-tensors builds the model's
    zero-point params unpacked), so dequantize while loading instead; that path decompresses
    every module with the first config group, so it only works when all modules share one scheme.
    """
    if case.symmetric:
        return AutoModelForCausalLM.from_pretrained(path, dtype=case.dtype)
    assert not case.mixed_groups
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=case.dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
    )


TRANSFORMERS_CASES = [c.id for c in CASES if c.symmetric or not c.mixed_groups]


@pytest.mark.parametrize("case_id", TRANSFORMERS_CASES)
def test_transformers_loads_checkpoint_with_same_logits(build, case_id):
    case = STATIC_CASES[case_id]
    model, quantized, out = build(case)
    loaded = transformers_load(out, case).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    got, want = logits(loaded, ids), logits(model, ids)  # the first forward decompresses
    assert got.dtype == case.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, qw in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, expected_weight(qw, case.dtype)), name
    state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        if name.removesuffix(".weight") not in quantized:
            assert byte_equal(state[name], tensor), name
    if case.tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.xfail(raises=RuntimeError, strict=True, reason="compressed-tensors 0.20 expects unpacked zero points "
                   "when transformers loads a compressed asymmetric checkpoint (llm-compressor#1618)")
def test_transformers_default_load_of_asymmetric_checkpoint(build):
    case = STATIC_CASES[Case(4, 64, False, "none").id]
    model, quantized, out = build(case)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=case.dtype)
    ids = torch.randint(0, VOCAB, (1, 5))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. dynamic act-order: vLLM's historical "group" layout, read by fabricq
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", list(DYNAMIC_CASES))
def test_dynamic_actorder_writes_g_idx(build, case_id):
    from compressed_tensors.quantization import QuantizationConfig

    case = DYNAMIC_CASES[case_id]
    model, quantized, out = build(case)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["actorder"] for g in q["config_groups"].values()} == {"group"}
    tensors = read_checkpoint(out)
    for name, qw in quantized.items():
        g_idx = tensors[f"{name}.weight_g_idx"]
        assert g_idx.dtype == torch.int32 and torch.equal(g_idx, qw.g_idx)
    # the test means something only if some group map is not contiguous
    assert any(not torch.equal(qw.g_idx, qw.g_idx.sort().values) for qw in quantized.values())
    dense = load_dequantized_state_dict(out)
    for name, qw in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], expected_weight(qw, case.dtype)), name
    # compressed-tensors >= 0.19 refuses the layout, as documented.
    with pytest.raises(ValueError, match="actorder"):
        QuantizationConfig.model_validate(q)


# ---------------------------------------------------------------------------------------------
# 4. unquantized tensors are stored byte for byte; tied embeddings as save_pretrained does
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [CASES[0].id, CASES[1].id, CASES[2].id, CASES[3].id])
def test_checkpoint_tensors(build, case_id):
    case = STATIC_CASES[case_id]
    model, quantized, out = build(case)
    tensors = read_checkpoint(out)
    state = model.state_dict()
    plain = {k for k in state if k.removesuffix(".weight") not in quantized}
    if case.tie:
        plain.discard("lm_head.weight")
    else:
        assert "lm_head.weight" in plain
    expected_keys = set(plain)
    for name, qw in quantized.items():
        expected_keys |= {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"}
        if not case.symmetric:
            expected_keys.add(f"{name}.weight_zero_point")
    assert tensors.keys() == expected_keys
    for key in plain:
        assert byte_equal(tensors[key], state[key]), key
    for name, qw in quantized.items():
        rows, cols = qw.codes.shape
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_packed"].shape == (rows, -(-cols * case.bits // 32))
        assert tensors[f"{name}.weight_scale"].dtype == case.dtype
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        assert tensors[f"{name}.weight_shape"].dtype == torch.int64


def test_zero_points_match_compressed_tensors_packing(build):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    model, quantized, out = build(STATIC_CASES[Case(2, 32, False, "none", method="rtn").id])
    tensors = read_checkpoint(out)
    for name, qw in quantized.items():
        assert torch.equal(tensors[f"{name}.weight_packed"], pack_to_int32(qw.codes, 2))
        assert torch.equal(tensors[f"{name}.weight_zero_point"], pack_to_int32(qw.zero.to(torch.int8), 2, packed_dim=0))


def test_sharded_checkpoint_with_tokenizer_and_generation_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    case = Case(4, 64, True, "static")
    model = make_model(case.dtype, case.tie, seed=5)
    model.config.quantization_config = {"quant_method": "gguf"}  # e.g. a model read from GGUF
    quantized = quantize_model(model, case)
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    save_compressed_checkpoint(model, quantized, tmp_path, tokenizer, max_shard_size=40_000)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "generation_config.json").exists()
    assert (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors"
    )
    dense = load_dequantized_state_dict(tmp_path)
    assert set(index["weight_map"]) == set(read_checkpoint(tmp_path))
    for name, qw in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], qw.dequantize())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([PreTrainedTokenizerFast.from_pretrained(tmp_path)("t1 t2 t3 t99")["input_ids"]])
    assert ids.tolist() == [[1, 2, 3, 99]]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_rejects_scales_not_representable_in_model_dtype(tmp_path):
    model = make_model(torch.bfloat16, tie=False)
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight.data
    qw = rtn_quantize(weight, QuantScheme(4, 64, True, "none"), scale_dtype=torch.float32)
    with pytest.raises(ValueError, match="not representable"):
        save_compressed_checkpoint(model, {name: qw}, tmp_path)


def test_rejects_group_size_not_dividing_columns(tmp_path):
    model = make_model(torch.float32, tie=False)
    name = "model.layers.0.self_attn.q_proj"  # 96 columns
    qw = rtn_quantize(model.get_submodule(name).weight.data, QuantScheme(4, 64, True, "none"))
    with pytest.raises(ValueError, match="does not divide"):
        save_compressed_checkpoint(model, {name: qw}, tmp_path)


@pytest.mark.parametrize("bits, symmetric, actorder", [(4, True, "static"), (3, False, "dynamic"), (2, False, "none")])
def test_packed_weight_is_the_same_weight_in_fewer_bytes(bits, symmetric, actorder):
    """What a run holds of each finished module until export (below 8 bits): the same codes,
    dequantized weight and exported tensors as the int8 form, in bits/8 of its bytes."""
    from fabricq.checkpoint.compressed_tensors import compressed_tensors_for

    g = torch.Generator().manual_seed(bits)
    w, x = torch.randn(40, 96, generator=g), torch.randn(300, 96, generator=g)
    qw = gptq_quantize(w, x.T @ x / 300, QuantScheme(bits, 32, symmetric, actorder), block_size=32)
    packed = qw.packed()
    assert packed.shape == qw.shape == (40, 96)
    assert torch.equal(packed.codes, qw.codes)
    assert torch.equal(packed.dequantize(), qw.dequantize())
    assert packed.packed_codes.numel() * 4 == 40 * 96 * bits // 8
    a, b = compressed_tensors_for("m", qw, torch.float32), compressed_tensors_for("m", packed, torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_callback_holds_packed_codes_below_8_bits():
    from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
    from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight

    for bits, kind in ((4, PackedQuantizedWeight), (8, QuantizedWeight)):
        callback = GPTQCallback(GPTQSettings(method="rtn", scheme=QuantScheme(bits, 32, True, "none")))
        module = torch.nn.Linear(64, 16, bias=False)
        callback.quantize_group(["m"], [module], None)
        held = callback.quantized["m"]
        assert isinstance(held, kind)
        assert torch.equal(module.weight.data, held.dequantize())
