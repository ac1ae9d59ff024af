"""A model folder is checked from its files before it is loaded: config.json, tokenizer, the
weight files' tensors against the model the config builds, and NaN/Inf anywhere in them. A NaN
that appears during the run stops it at the module. Each case is a copy of the tiny real Llama
(stories260k: 5 layers, hidden 64, intermediate 172, vocab 512, tied embeddings) with one defect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fabricq.errors import FabricqError
from fabricq.models import (
    ModelSource,
    check_model_files,
    check_something_quantized,
    load_tokenizer,
)


@pytest.fixture
def model(shared_path, tmp_path) -> Path:
    folder = tmp_path / "stories260k"
    shutil.copytree(shared_path("models", "stories260k"), folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def check(folder: Path) -> dict:
    return check_model_files(ModelSource(folder))


def test_the_unmodified_model_passes_with_its_tied_lm_head_absent(model):
    assert "lm_head.weight" not in load_file(model / "model.safetensors")
    assert check(model)["num_hidden_layers"] == 5


def test_a_missing_tensor_is_named(model):
    edit_weights(model, lambda t: t.pop("model.layers.2.self_attn.q_proj.weight"))
    with pytest.raises(FabricqError, match=r"model.layers.2.self_attn.q_proj.weight is missing from the weight files .*"
                                           r"\(1 missing\): config.json \(model_type=llama\) needs it; transformers would fill "
                                           "it with random values"):
        check(model)


def test_num_hidden_layers_smaller_than_the_weights(model):
    edit_config(model, num_hidden_layers=4)
    with pytest.raises(FabricqError, match=r"config.json num_hidden_layers=4 but the weight files hold 5 layers "
                                           r"\(model.layers.4.input_layernorm.weight in model.safetensors\): a model "
                                           "built from this config would drop layers"):
        check(model)


def test_num_hidden_layers_larger_than_the_weights(model):
    edit_config(model, num_hidden_layers=6)
    with pytest.raises(FabricqError, match=r"model.layers.5.input_layernorm.weight is missing .*\(9 missing\): "
                                           "config.json num_hidden_layers=6 but the weight files hold 5 layers"):
        check(model)


def test_an_untied_lm_head_that_is_missing(model):
    edit_config(model, tie_word_embeddings=False)
    with pytest.raises(FabricqError, match="lm_head.weight is missing .* tie_word_embeddings=false: set it to true"):
        check(model)


def test_a_shape_that_differs_from_the_config_names_the_field(model):
    edit_config(model, intermediate_size=160)
    with pytest.raises(FabricqError, match=r"model.layers.0.mlp.down_proj.weight has shape \[64, 172\] in "
                                           r"model.safetensors but config.json builds \[64, 160\] \(intermediate_size=160\)"):
        check(model)


def test_an_integer_tensor_where_the_model_holds_floats(model):
    edit_weights(model, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(FabricqError, match="model.norm.weight is stored as I32 in model.safetensors where the model "
                                           "holds float32"):
        check(model)


def test_a_tied_lm_head_stored_with_other_values(model):
    edit_weights(model, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] * 2}))
    with pytest.raises(FabricqError, match="lm_head.weight differs from model.embed_tokens.weight .* config.json ties them"):
        check(model)
    edit_weights(model, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    check(model)  # an identical copy is what save_pretrained may write: fine


@pytest.mark.parametrize("name, value", [
    ("model.embed_tokens.weight", float("nan")),
    ("model.layers.3.post_attention_layernorm.weight", float("inf")),
    ("model.norm.weight", float("-inf")),
    ("model.layers.1.mlp.up_proj.weight", float("nan")),
])
def test_nan_or_inf_in_any_tensor_is_found_in_the_files(model, name, value):
    def poison(tensors):
        flat = tensors[name].view(-1)
        flat[7] = value
        flat[-1] = value

    edit_weights(model, poison)
    module = name.removesuffix(".weight")
    with pytest.raises(FabricqError, match=rf"weights of {module} contain 2 NaN/Inf values \({name} in model.safetensors\)"):
        check(model)


def test_nan_in_an_untied_lm_head(model):
    edit_config(model, tie_word_embeddings=False)
    edit_weights(model, lambda t: t.update({"lm_head.weight": torch.full_like(t["model.embed_tokens.weight"], float("nan"))}))
    with pytest.raises(FabricqError, match=r"weights of lm_head contain 32768 NaN/Inf values"):
        check(model)


def test_the_scan_reads_large_tensors_in_chunks(model, monkeypatch):
    """A NaN in the last chunk of a tensor read in many chunks is still found."""
    import fabricq.weights

    monkeypatch.setattr(fabricq.weights, "SCAN_ELEMENTS", 100)
    edit_weights(model, lambda t: t["model.embed_tokens.weight"].__setitem__((511, 63), float("nan")))
    with pytest.raises(FabricqError, match="weights of model.embed_tokens contain 1 NaN/Inf"):
        check(model)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('{"hidden_size": 64}', 'has no model_type field: add the architecture'),
    ("{not json", "is not valid JSON"),
])
def test_config_json_that_is_not_a_model_config(model, content, message):
    (model / "config.json").write_text(content)
    with pytest.raises(FabricqError, match=message):
        check(model)


def test_zero_layers_is_said_plainly(model):
    edit_config(model, num_hidden_layers=0)
    with pytest.raises(FabricqError, match="declares num_hidden_layers=0: a model needs at least one layer"):
        check(model)


def test_an_already_quantized_model_is_refused(model):
    edit_config(model, quantization_config={"quant_method": "compressed-tensors"})
    with pytest.raises(FabricqError, match="already quantized model .*quant_method=compressed-tensors"):
        check(model)


def test_missing_tokenizer_is_reported_before_loading(model):
    for name in ("tokenizer.json", "tokenizer.model"):
        (model / name).unlink()
    with pytest.raises(FabricqError, match=r"has no tokenizer \(none of tokenizer.json, tokenizer.model\)"):
        check(model)


def test_corrupt_tokenizer_names_the_file(model):
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(FabricqError, match=f"{model / 'tokenizer.json'} is corrupt"):
        check(model)
    (model / "tokenizer.json").write_text("{}")  # JSON, but not a tokenizer
    (model / "tokenizer.model").unlink()
    with pytest.raises(FabricqError, match=r"could not load the tokenizer from .*\(tokenizer.json, tokenizer_config.json\)"):
        load_tokenizer(ModelSource(model))


def test_a_tokenizer_larger_than_the_embedding(model):
    edit_config(model, vocab_size=400)
    edit_weights(model, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:400].clone()}))
    check(model)
    with pytest.raises(FabricqError, match="has 512 tokens but config.json vocab_size=400"):
        load_tokenizer(ModelSource(model))


def test_sharded_weights_are_checked_across_shards(model):
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:20], "model-00002-of-00002.safetensors": names[20:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, model / file, metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    check(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FabricqError, match="names weight files that are missing: model-00002-of-00002.safetensors"):
        check(model)


def test_quant_ignore_must_leave_something_to_quantize():
    targets = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    check_something_quantized(targets, [])
    check_something_quantized(targets, [r"down_proj"])
    with pytest.raises(FabricqError, match=r"quant.ignore matches all 4 Linear modules .*nothing would be quantized"):
        check_something_quantized(targets, [r"down_proj", r"q_proj"])


def test_a_nan_result_stops_the_run_at_the_module():
    """What the solve hands to `install` (a resumed layer file too): a NaN loss (a NaN Hessian
    gives one, with a round-to-nearest fallback whose codes look fine) or a NaN scale."""
    from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
    from fabricq.quant.gptq import rtn_quantize
    from fabricq.quant.grid import QuantScheme

    scheme = QuantScheme(4, 16, True, "static")
    callback = GPTQCallback(GPTQSettings(scheme=scheme))
    module = torch.nn.Linear(32, 8, bias=False)
    good = rtn_quantize(module.weight.data, scheme)
    with pytest.raises(FabricqError, match=r"model.layers.0.mlp.up_proj: quantization produced NaN/Inf"):
        callback.install("model.layers.0.mlp.up_proj", module, good, {"loss": float("nan"), "rtn_loss": 1.0})
    good.scale[0, 0] = float("nan")
    with pytest.raises(FabricqError, match=r"model.layers.0.mlp.up_proj: quantization produced NaN/Inf"):
        callback.install("model.layers.0.mlp.up_proj", module, good, {"loss": 1.0})
    assert torch.isfinite(module.weight).all()  # nothing was installed
