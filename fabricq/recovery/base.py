"""The quantized base as exported: a fabricq output folder read back into packed weights.

`read_run` checks that a folder is a finished fabricq output (its report, its resolved config and
a compressed-tensors pack-quantized checkpoint whose tensors agree with that config) and returns
every quantized module's codes, scales, zero points and groups without dequantizing them, plus
the checkpoint's other tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fabricq.checkpoint.compressed_tensors import PACK_FORMAT, QUANT_METHOD
from fabricq.checkpoint.compressed_tensors import weights_for as _weights_for
from fabricq.checkpoint.files import CONFIG_NAME
from fabricq.checkpoint.files import read_safetensors as _read_tensors
from fabricq.errors import FabricqError
from fabricq.quant.gptq import PackedQuantizedWeight
from fabricq.quant.grid import QuantScheme
from fabricq.quant.packing import packed_width, unpack_int32

RUN_FILES = ("report.json", "fabricq_config.yaml", CONFIG_NAME)
_ACTORDER = {None: "none", "weight": "static", "group": "dynamic"}


@dataclass
class QuantizedRun:
    folder: Path
    config: dict  # config.json
    quantized: dict[str, PackedQuantizedWeight]
    tensors: dict[str, torch.Tensor]  # everything else the checkpoint holds
    report: dict


def check_run_dir(folder: Path) -> None:
    """Cheap checks that `folder` is a finished fabricq output, one clear error each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FabricqError(f"RUN_DIR {folder} is not a directory (pass the output_dir of a fabricq run)")
    missing = [name for name in RUN_FILES if not (folder / name).is_file()]
    if missing:
        raise FabricqError(f"RUN_DIR {folder} is not a fabricq output: {', '.join(missing)} missing")
    documents = {}
    for name in ("report.json", CONFIG_NAME):
        try:
            documents[name] = json.loads((folder / name).read_text())
        except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError (random bytes), unreadable
            raise FabricqError(f"RUN_DIR {folder} is corrupted: {name} is unreadable "
                               f"({' '.join(str(err).split())[:160]})") from None
        if not isinstance(documents[name], dict):
            raise FabricqError(f"RUN_DIR {folder} is corrupted: {name} is not a JSON object "
                               f"(a {type(documents[name]).__name__})")
    config = documents[CONFIG_NAME]
    qconfig = config.get("quantization_config")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise FabricqError(f"RUN_DIR {folder} is corrupted: {CONFIG_NAME}'s quantization_config is not a JSON object")
    qconfig = qconfig or {}
    groups = qconfig.get("config_groups")
    if groups is not None and (not isinstance(groups, dict)
                               or not all(isinstance(g, dict) and isinstance(g.get("targets"), list)
                                          and isinstance(g.get("weights"), dict) for g in groups.values())):
        raise FabricqError(f"RUN_DIR {folder} is corrupted: {CONFIG_NAME}'s quantization_config.config_groups is not "
                           "a JSON object of groups with targets and weights")
    ignore = qconfig.get("ignore")
    if ignore is not None and not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        raise FabricqError(f"RUN_DIR {folder} is corrupted: {CONFIG_NAME}'s quantization_config.ignore is not a list "
                           "of module names")
    if qconfig.get("quant_method") != QUANT_METHOD or qconfig.get("format") != PACK_FORMAT:
        raise FabricqError(f"RUN_DIR {folder} holds no compressed-tensors {PACK_FORMAT} checkpoint "
                           "(recovery reads fabricq's compressed-tensors export)")


def _scheme(args: dict, module: str) -> QuantScheme:
    strategy = args.get("strategy")
    if strategy not in ("group", "channel"):
        raise FabricqError(f"{module}: unsupported weight strategy {strategy!r} in quantization_config")
    actorder = _ACTORDER.get(args.get("actorder"), "none")
    try:
        group = args["group_size"] if strategy == "group" else -1
        bits = args["num_bits"]
        if type(bits) is not int or type(group) is not int:
            raise TypeError(f"num_bits {bits!r}, group_size {group!r}")
        return QuantScheme(bits, group, bool(args.get("symmetric", True)), actorder)
    except (KeyError, TypeError, ValueError) as err:
        raise FabricqError(f"checkpoint is corrupted: {module}'s quantization_config weights are unusable "
                           f"({type(err).__name__}: {err})") from None


def _packed_module(module: str, tensors: dict, config_groups: dict) -> PackedQuantizedWeight:
    try:
        args = _weights_for(module, config_groups)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FabricqError(f"checkpoint is corrupted: {err}") from None
    scheme = _scheme(args, module)
    packed = tensors.pop(f"{module}.weight_packed")
    shape = tensors.pop(f"{module}.weight_shape", None)
    scale = tensors.pop(f"{module}.weight_scale", None)
    if shape is None or scale is None:
        raise FabricqError(f"checkpoint is corrupted: {module} has weight_packed without weight_shape/weight_scale")
    rows, cols = (int(v) for v in shape)
    if tuple(packed.shape) != (rows, packed_width(cols, scheme.bits)) or packed.dtype != torch.int32:
        raise FabricqError(f"checkpoint is corrupted: {module}.weight_packed is {tuple(packed.shape)} "
                           f"{packed.dtype} for a {rows}×{cols} weight at {scheme.bits} bits")
    scale = scale[:, None] if scale.dim() == 1 else scale
    groups = scale.shape[1]
    if scale.shape[0] != rows or groups != scheme.groups_for(cols):
        raise FabricqError(f"checkpoint is corrupted: {module}.weight_scale is {tuple(scale.shape)}, "
                           f"expected ({rows}, {scheme.groups_for(cols)})")
    zero_packed = tensors.pop(f"{module}.weight_zero_point", None)
    if scheme.symmetric or zero_packed is None:
        zero = torch.zeros(rows, groups)
    else:
        zero = unpack_int32(zero_packed, scheme.bits, rows, dim=0).float()
    g_idx = tensors.pop(f"{module}.weight_g_idx", None)
    if g_idx is None:
        size = cols if scheme.group_size == -1 else scheme.group_size
        g_idx = torch.arange(cols, dtype=torch.int32) // size
    if not torch.isfinite(scale).all():
        raise FabricqError(f"checkpoint is corrupted: {module}.weight_scale holds NaN/Inf")
    return PackedQuantizedWeight(packed.contiguous(), cols, scale.float(), zero, g_idx.to(torch.int32), scheme)


def read_run(folder: Path) -> QuantizedRun:
    """Every quantized module of the output in `folder`, packed, and the remaining tensors."""
    folder = Path(folder)
    check_run_dir(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    try:
        tensors = _read_tensors(folder)
    except Exception as err:  # a missing shard, a torn file: safetensors' own error types
        raise FabricqError(f"RUN_DIR {folder} is corrupted: cannot read its checkpoint ({err})") from None
    config_groups = config["quantization_config"].get("config_groups") or {}
    names = [n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")]
    if not names:
        raise FabricqError(f"RUN_DIR {folder} is corrupted: its checkpoint has no quantized module")
    quantized = {name: _packed_module(name, tensors, config_groups) for name in names}
    report = json.loads((folder / "report.json").read_text())
    return QuantizedRun(folder, config, quantized, tensors, report)


def load_exported_tensors(model, run: QuantizedRun) -> None:
    """Give `model` the checkpoint's unquantized tensors (norms, embeddings, …) exactly as
    exported; every one must exist in the model with the same shape."""
    state = model.state_dict()
    for key, tensor in run.tensors.items():
        if key not in state:
            raise FabricqError(f"RUN_DIR {run.folder}: checkpoint tensor {key} does not exist in the model")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise FabricqError(f"RUN_DIR {run.folder}: checkpoint tensor {key} is {tuple(tensor.shape)}, the "
                               f"model's is {tuple(state[key].shape)}")
    with torch.no_grad():
        for key, tensor in run.tensors.items():
            state[key].copy_(tensor)
