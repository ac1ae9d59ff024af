"""A quantized checkpoint folder read back: its format told from config.json, the model it
describes built on the meta device (no weights materialised), every tensor checked against both
by the format's reader (`compressed_tensors.read_compressed`, `gptq.read_gptq`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fabricq.checkpoint.compressed_tensors import read_compressed
from fabricq.checkpoint.engines import ModuleSpec
from fabricq.checkpoint.files import CONFIG_NAME, QuantizedCheckpoint, read_checked_safetensors
from fabricq.checkpoint.gptq import read_gptq
from fabricq.cli import json_type, read_json_object
from fabricq.errors import FabricqError


@dataclass
class Checkpoint(QuantizedCheckpoint):
    fmt: str = ""
    path: Path = Path()
    meta_model: torch.nn.Module | None = None
    tensor_count: int = 0  # tensors in the files, all checked


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def meta_model(config: dict):
    """The model config.json describes, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    check_model_type(plain.get("model_type"))
    try:
        model_config = AutoConfig.for_model(**plain)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except Exception as err:  # noqa: BLE001 - transformers raises whatever a field's wrong value causes
        raise FabricqError(f"config.json does not describe a model transformers can build: {_short(err)}") from None


def check_model_type(model_type) -> None:
    """config.json's model_type must name a causal LM this transformers knows; the message names
    the closest known types (transformers' own lists every one it has: 12 KB)."""
    import difflib

    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model_type, str) or not model_type:
        raise FabricqError(f"config.json: model_type must name a model architecture (as \"llama\"), got {model_type!r}")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        raise FabricqError(f"config.json: model_type {model_type!r} is not one transformers {transformers.__version__} "
                           f"knows{' (closest: ' + ', '.join(close) + ')' if close else ''}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FabricqError(f"config.json: model_type {model_type!r} is not a causal language model "
                           "(transformers has no AutoModelForCausalLM class for it)")


def _short(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def detect_format(config: dict) -> str:
    qconfig = config.get("quantization_config")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise FabricqError(f"config.json: quantization_config is a JSON {json_type(qconfig)}, not an object")
    if not qconfig:
        raise FabricqError("config.json has no quantization_config: not a quantized checkpoint")
    method = qconfig.get("quant_method")
    if method == "compressed-tensors":
        return "compressed-tensors"
    if method == "gptq":
        fmt = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
        if fmt != "gptq":
            raise FabricqError(f"quantization_config.checkpoint_format {fmt!r}: fabricq reads the GPTQ v1 "
                               "format 'gptq'")
        return "gptq"
    raise FabricqError(f"unknown format: quantization_config.quant_method {method!r} (fabricq reads "
                       "'compressed-tensors' and 'gptq')")


def load_checkpoint(path) -> Checkpoint:
    """Read and fully check a quantized checkpoint directory."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    path = Path(path)
    if not path.is_dir():
        raise FabricqError(f"{path} is a file, not a checkpoint directory" if path.exists() else
                           f"checkpoint directory {path} does not exist")
    config = read_json_object(path / CONFIG_NAME)
    fmt = detect_format(config)
    model = meta_model(config)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors = read_checked_safetensors(path)
    count = len(tensors)
    reader = read_compressed if fmt == "compressed-tensors" else read_gptq
    checkpoint = reader(tensors, config, shapes)
    expected = remove_tied_weights_from_state_dict(model.state_dict(), model)
    for name in checkpoint.quantized:
        expected.pop(f"{name}.weight")
    for key, tensor in checkpoint.tensors.items():
        if key not in expected:
            raise FabricqError(f"tensor {key} is not a parameter or buffer of the model config.json describes")
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise FabricqError(f"tensor {key} has shape {tuple(tensor.shape)}, the config gives {tuple(want.shape)}")
        if tensor.is_floating_point() != want.is_floating_point():
            kind = "floating-point" if want.is_floating_point() else "integer"
            raise FabricqError(f"tensor {key} is {dtype_name(tensor.dtype)}, expected a {kind} dtype")
    missing = sorted(set(expected) - set(checkpoint.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FabricqError(f"missing tensor {missing[0]}{more}")
    return Checkpoint(checkpoint.config, checkpoint.tensors, checkpoint.quantized, checkpoint.quantization_config,
                      fmt=fmt, path=path, meta_model=model, tensor_count=count)


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    name = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype")
    if name in ("float16", "bfloat16", "float32"):
        return getattr(torch, name)
    floats = [t.dtype for t in checkpoint.tensors.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def specs_of(checkpoint: Checkpoint) -> list[ModuleSpec]:
    return [ModuleSpec(n, *qw.shape, qw.scheme.bits, qw.scheme.group_size, qw.scheme.symmetric, qw.scheme.actorder)
            for n, qw in checkpoint.quantized.items()]


def load_dequantized_gptq_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ checkpoint (checked like `python -m fabricq.inspect` does), quantized
    modules dequantized to a float32 `m.weight`."""
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint.fmt != "gptq":
        raise FabricqError(f"{checkpoint_dir} is a {checkpoint.fmt} checkpoint, not the GPTQ format")
    out = dict(checkpoint.tensors)
    for name, qw in checkpoint.quantized.items():
        out[f"{name}.weight"] = qw.dequantize()
    return out
