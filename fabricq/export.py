"""Write quantized models as compressed-tensors `pack-quantized` checkpoints, and read them back.

`save_compressed_checkpoint` writes a directory that transformers (through compressed-tensors)
and vLLM load as they load checkpoints produced by llm-compressor:

- config.json: the model's config (any previous `quantization_config`, e.g. a GGUF one, is
  dropped) plus a compressed-tensors `quantization_config` (format "pack-quantized", status
  "compressed"). It has one config group per distinct (bits, group size, symmetry, act-order):
  the group size may differ per module because fabricq falls back, per module, to a smaller
  group size that divides the input width (`fabricq.quant.grid.effective_group_size`). A group
  targets its modules with one `re:` regex per module-name suffix relative to the decoder layer
  (e.g. `re:.*\\.self_attn\\.q_proj$`) when that regex selects exactly those modules, and by
  exact module names otherwise. `ignore` lists every Linear module left unquantized (lm_head...).
- model.safetensors (or shards plus model.safetensors.index.json past `max_shard_size`): every
  unquantized parameter and persistent buffer as the model holds it (tied weights removed the
  way `save_pretrained` removes them), and for each quantized module `m`:
    `m.weight_packed`      int32 (rows, ceil(cols·bits/32)), codes packed along the columns,
    `m.weight_scale`       (rows, groups) in the model's dtype,
    `m.weight_shape`       int64 [rows, cols],
    `m.weight_zero_point`  int32 (ceil(rows·bits/32), groups), zero points packed along the
                           rows — asymmetric schemes only, as compressed-tensors' own
                           PackedQuantizationCompressor writes it.
- the tokenizer and the generation config, when given / present.

Act-order. "static" act-order (the default) changes only the order GPTQ solves columns in:
groups stay contiguous, nothing extra is stored, and the config says `actorder: "weight"`.
Every compressed-tensors loader reads it. "dynamic" act-order lets groups follow the solve order,
so each column's group must be stored: we then write the layout vLLM has historically read for
compressed-tensors W4A16 with `actorder: "group"` — that value in the config and an extra
`m.weight_g_idx` int32 (cols,) tensor. compressed-tensors >= 0.19 removed "group" act-order and
refuses such configs (so transformers cannot load them); `load_dequantized_state_dict` reads them.
Prefer static act-order unless the target runtime is known to accept "group".

`load_dequantized_state_dict` is fabricq's own reader: it unpacks and dequantizes every quantized
module back to a dense `m.weight` (in the scale's dtype) and returns all other tensors as stored.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fabricq.output import apply_umask
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.grid import dequantize_groups
from fabricq.quant.packing import pack_int32, packed_width, unpack_int32

__all__ = ["save_compressed_checkpoint", "load_dequantized_state_dict"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PACK_FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
# What the config says for fabricq's act-order modes ("dynamic" is written by hand, see above).
_CT_ACTORDER = {"none": None, "static": "weight", "dynamic": "group"}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_compressed_checkpoint(
    model,
    quantized: dict[str, QuantizedWeight],
    output_dir: Path,
    tokenizer=None,
    *,
    ignore: list[str] | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> None:
    """Write `model` with the modules in `quantized` packed, as a compressed-tensors checkpoint.

    model: a transformers PreTrainedModel whose quantized Linear modules hold the dequantized
        weights (only their shapes and dtype are used; the codes come from `quantized`).
    quantized: module name (as in `model.named_modules()`) → its QuantizedWeight (or PackedQuantizedWeight).
    ignore: extra entries for the config's `ignore` list (module names or `re:` patterns);
        unquantized Linear modules are listed there anyway.
    dtype: the dtype of the unquantized floating-point tensors and of the scales (default: the
        model's); the scales must be exactly representable in it.
    """
    output_dir = Path(output_dir)
    modules = dict(model.named_modules())
    _validate(model, modules, quantized, scale_dtype=dtype)

    state_dict = _unquantized_state_dict(model, quantized)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    for name in sorted(quantized):
        state_dict.update(_compressed_tensors_for(name, quantized[name], dtype or modules[name].weight.dtype))

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype or model.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["quantization_config"] = build_quantization_config(model, quantized, ignore)

    output_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(state_dict, output_dir, max_shard_size)
    (output_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    for path in output_dir.iterdir():  # safetensors creates its files 0600: give them the umask's mode
        apply_umask(path)


def _validate(model, modules: dict, quantized: dict[str, QuantizedWeight], scale_dtype=None) -> None:
    names_by_storage = defaultdict(list)
    for key, tensor in model.state_dict().items():
        if tensor.device.type != "meta":
            names_by_storage[(tensor.device, tensor.untyped_storage().data_ptr())].append(key)
    for name, qw in quantized.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise KeyError(f"{name!r} is not a module with a weight in {type(model).__name__}")
        rows, cols = module.weight.shape
        scheme = qw.scheme
        if tuple(qw.shape) != (rows, cols):
            raise ValueError(f"{name}: codes {tuple(qw.shape)} vs weight {(rows, cols)}")
        if scheme.group_size != -1 and cols % scheme.group_size != 0:
            raise ValueError(
                f"{name}: group size {scheme.group_size} does not divide {cols} input columns; "
                "no compressed-tensors loader accepts that (use effective_group_size)"
            )
        groups = scheme.groups_for(cols)
        if tuple(qw.scale.shape) != (rows, groups) or tuple(qw.zero.shape) != (rows, groups):
            raise ValueError(f"{name}: scale/zero must be {(rows, groups)}, got {tuple(qw.scale.shape)}")
        # (Packed codes are on the grid by construction: b bits unpack to [qmin, qmax].)
        if isinstance(qw, QuantizedWeight) and (qw.codes.min() < scheme.qmin or qw.codes.max() > scheme.qmax):
            raise ValueError(f"{name}: codes outside [{scheme.qmin}, {scheme.qmax}]")
        if scheme.symmetric and bool((qw.zero != 0).any()):
            raise ValueError(f"{name}: symmetric scheme with non-zero zero points")
        if scheme.actorder != "dynamic":
            expected = torch.zeros(cols, dtype=torch.long) if scheme.group_size == -1 else (
                torch.arange(cols) // scheme.group_size
            )
            if not torch.equal(qw.g_idx.long().cpu(), expected):
                raise ValueError(f"{name}: groups must be contiguous unless actorder is 'dynamic'")
        dtype = scale_dtype or module.weight.dtype
        scale = qw.scale.float().cpu()
        if not torch.equal(scale.to(dtype).float(), scale):
            raise ValueError(
                f"{name}: scales are not representable in {dtype}, the dtype they are stored in "
                "(quantize with scale_dtype equal to the model's dtype)"
            )
        storage = (module.weight.device, module.weight.untyped_storage().data_ptr())
        other = [n for n in names_by_storage.get(storage, []) if n != f"{name}.weight"]
        if other:
            raise ValueError(f"{name}: a quantized weight may not be tied to {other}")


def _unquantized_state_dict(model, quantized) -> dict[str, torch.Tensor]:
    """The model's state dict without the quantized weights, tied aliases removed like
    `save_pretrained` does (e.g. lm_head.weight when tied to the embeddings)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    for name in quantized:
        state_dict.pop(f"{name}.weight")
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _compressed_tensors_for(name: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    scheme = qw.scheme
    rows, cols = qw.shape
    if isinstance(qw, PackedQuantizedWeight):  # already in this layout
        packed = qw.packed_codes.cpu().contiguous()
    else:
        packed = pack_int32(qw.codes.cpu().to(torch.int8), scheme.bits, dim=1)
    out = {
        f"{name}.weight_packed": packed,
        f"{name}.weight_scale": qw.scale.cpu().to(dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not scheme.symmetric:
        zero = qw.zero.cpu().to(torch.int8)
        out[f"{name}.weight_zero_point"] = pack_int32(zero, scheme.bits, dim=0)
    if scheme.actorder == "dynamic":
        out[f"{name}.weight_g_idx"] = qw.g_idx.cpu().to(torch.int32).contiguous()
    return out


def _write_safetensors(state_dict: dict[str, torch.Tensor], output_dir: Path, max_shard_size) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, output_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (output_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# The quantization config
# ---------------------------------------------------------------------------------------------


def _scheme_key(qw: QuantizedWeight) -> tuple:
    s = qw.scheme
    return (s.bits, s.group_size, s.symmetric, s.actorder)


def _layer_suffix(name: str) -> str | None:
    """The part of a module name after its decoder-layer index: "model.layers.3.mlp.up_proj" →
    "mlp.up_proj"; None for modules outside numbered layers."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return None


def _suffix_regex(suffix: str) -> str:
    # Digits inside the suffix (an expert's index) stay literal: the names are grouped by their
    # exact suffix, so a pattern for any index would also select the other experts.
    return "re:.*\\." + re.escape(suffix) + "$"


def _targets_for(model, names: list[str]) -> list[str]:
    """Targets selecting exactly `names` (all one scheme) among the model's modules."""
    from compressed_tensors.utils.match import match_name

    all_names = [n for n, _ in model.named_modules()]
    by_suffix: dict[str | None, list[str]] = defaultdict(list)
    for name in names:
        by_suffix[_layer_suffix(name)].append(name)
    targets = []
    for suffix, members in sorted(by_suffix.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        if suffix is not None:
            regex = _suffix_regex(suffix)
            if {n for n in all_names if match_name(n, regex)} == set(members):
                targets.append(regex)
                continue
        targets.extend(sorted(members))
    return targets


def _weight_args(key: tuple):
    from compressed_tensors.quantization import QuantizationArgs

    bits, group_size, symmetric, actorder = key
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
        # "group" no longer validates (compressed-tensors >= 0.19): set after dumping.
        actorder=None if actorder == "dynamic" else _CT_ACTORDER[actorder],
        observer="minmax",
        dynamic=False,
    )


def build_quantization_config(model, quantized: dict[str, QuantizedWeight], ignore=None) -> dict:
    """The `quantization_config` entry of config.json, as compressed-tensors writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, qw in quantized.items():
        groups[_scheme_key(qw)].append(name)
    # Largest group first (it is the one loaders falling back on a single scheme would pick).
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))

    config_groups, dynamic_groups = {}, []
    for i, (key, names) in enumerate(ordered):
        group = f"group_{i}"
        config_groups[group] = QuantizationScheme(
            targets=_targets_for(model, names), weights=_weight_args(key), format=PACK_FORMAT
        )
        if key[3] == "dynamic":
            dynamic_groups.append(group)

    unquantized_linear = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized
    ]
    ignore_list = list(dict.fromkeys([*(ignore or []), *unquantized_linear]))
    config = QuantizationConfig(
        config_groups=config_groups,
        format=PACK_FORMAT,
        quantization_status="compressed",
        ignore=ignore_list,
    ).model_dump()
    for group in dynamic_groups:
        config["config_groups"][group]["weights"]["actorder"] = "group"
    config["quant_method"] = QUANT_METHOD
    config["version"] = compressed_tensors.__version__
    return config


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
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


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _weights_for(module: str, config_groups: dict) -> dict:
    for group in config_groups.values():
        if any(_match(module, t) for t in group["targets"]):
            return group["weights"]
    # Class-name targets ("Linear") cannot be checked without the model: accept a lone one.
    by_class = [g for g in config_groups.values() if any(t.isidentifier() for t in g["targets"])]
    if len(by_class) == 1:
        return by_class[0]["weights"]
    raise ValueError(f"no config group of the checkpoint targets {module!r}")


def load_dequantized_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a pack-quantized checkpoint, quantized modules dequantized to `m.weight`."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / CONFIG_NAME).read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != QUANT_METHOD or qconfig.get("format") != PACK_FORMAT:
        raise ValueError(f"{checkpoint_dir} is not a compressed-tensors {PACK_FORMAT} checkpoint")
    tensors = _read_tensors(checkpoint_dir)
    suffix = ".weight_packed"
    for module in [n[: -len(suffix)] for n in tensors if n.endswith(suffix)]:
        args = _weights_for(module, qconfig["config_groups"])
        bits = args["num_bits"]
        packed = tensors.pop(f"{module}.weight_packed")
        rows, cols = (int(v) for v in tensors.pop(f"{module}.weight_shape"))
        scale = tensors.pop(f"{module}.weight_scale")
        zero_packed = tensors.pop(f"{module}.weight_zero_point", None)
        g_idx = tensors.pop(f"{module}.weight_g_idx", None)
        if packed.shape != (rows, packed_width(cols, bits)):
            raise ValueError(f"{module}: packed shape {tuple(packed.shape)} for {(rows, cols)} at {bits} bits")
        if scale.dim() == 1:
            scale = scale[:, None]
        groups = scale.shape[1]
        codes = unpack_int32(packed, bits, cols, dim=1)
        if args.get("symmetric", True) or zero_packed is None:
            zero = torch.zeros(rows, groups)
        else:
            zero = unpack_int32(zero_packed, bits, rows, dim=0).float()
        if g_idx is None:
            strategy = args.get("strategy")
            if strategy == "group":
                g_idx = torch.arange(cols) // args["group_size"]
            elif strategy == "channel":
                g_idx = torch.zeros(cols, dtype=torch.long)
            else:
                raise ValueError(f"{module}: unsupported weight strategy {strategy!r}")
        weight = dequantize_groups(codes, scale.float(), zero, g_idx)
        tensors[f"{module}.weight"] = weight.to(scale.dtype)
    return tensors
