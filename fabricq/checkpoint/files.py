"""The files of a checkpoint: safetensors shards written and read, config.json, permissions, and
what both formats' readers return.

Writers call `write_safetensors` (one file, or shards plus model.safetensors.index.json past
`max_shard_size`) and then `make_readable` (safetensors creates its files 0600). Readers call
`read_safetensors` (plain) or `read_checked_safetensors` (every index entry and file checked, errors
naming them, as `python -m fabricq.inspect` needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fabricq.cli import read_json_object
from fabricq.errors import FabricqError
from fabricq.output import apply_umask
from fabricq.quant.gptq import QuantizedWeight

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


@dataclass
class QuantizedCheckpoint:
    """A checkpoint read into fabricq's terms: config.json without its quantization_config,
    the unquantized tensors, and each quantized module's codes and grid."""

    config: dict
    tensors: dict[str, torch.Tensor]
    quantized: dict[str, QuantizedWeight]
    quantization_config: dict


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_safetensors(state_dict: dict[str, torch.Tensor], output_dir: Path, max_shard_size) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, output_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (output_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(output_dir: Path, config: dict, name: str = CONFIG_NAME) -> None:
    (output_dir / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_readable(directory: Path, files_only: bool = False) -> None:
    """safetensors creates its files 0600: give what `directory` holds the umask's mode."""
    for path in Path(directory).iterdir():
        if not files_only or path.is_file():
            apply_umask(path)


def save_extras(model, tokenizer, output_dir: Path) -> None:
    """The model's generation config, when it has one, and the tokenizer, when given."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_safetensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s), as safetensors reads them."""
    index = checkpoint_dir / SAFE_WEIGHTS_INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [SAFE_WEIGHTS_NAME]
    )
    tensors = {}
    for filename in files:
        tensors.update(load_file(checkpoint_dir / filename))
    return tensors


def read_checked_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s); truncated or corrupt files and an
    index naming absent files or tensors are errors naming them."""
    index_path = path / SAFE_WEIGHTS_INDEX_NAME
    if index_path.exists():
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FabricqError(f"{index_path} has no weight_map")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or Path(filename).name != filename or filename in ("", ".", ".."):
                raise FabricqError(f"{index_path}: the weight_map puts {name} in {filename!r}, not the name of a file "
                                   "beside it")
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, [SAFE_WEIGHTS_NAME]
    tensors = {}
    for filename in files:
        file = path / filename
        if not file.is_file():
            raise FabricqError(f"weight file {file} is {'not a regular file' if file.exists() else 'missing'}")
        with open(file, "rb"):  # unreadable (permissions): that error, not "corrupt"
            pass
        try:
            tensors.update(load_file(file))
        except Exception as err:  # safetensors raises its own error type for bad headers/lengths
            raise FabricqError(f"corrupt or truncated safetensors file {file}: {err}") from None
    if weight_map is not None:
        for name, filename in weight_map.items():
            if name not in tensors:
                raise FabricqError(f"missing tensor {name} (the index puts it in {filename})")
    return tensors


def expect_tensor(name: str, tensor: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    if tensor.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FabricqError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, expected {allowed}")
    if tuple(tensor.shape) != tuple(shape):
        raise FabricqError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
