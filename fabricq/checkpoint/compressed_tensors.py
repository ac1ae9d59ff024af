"""The compressed-tensors `pack-quantized` format: its writer and its one reader.

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
refuses such configs (so transformers cannot load them); fabricq's reader reads them.
Prefer static act-order unless the target runtime is known to accept "group".

Reading: `read_compressed` decodes every quantized module of a checkpoint into codes and grid,
checking each tensor against the config and the model's Linear shapes (`fabricq.checkpoint.load`
gives it those); `weights_for` finds a module's config group. `load_dequantized_state_dict` reads
a folder back without building the model: every quantized module unpacked and dequantized to a
dense `m.weight` (in the scale's dtype), all other tensors as stored.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from fabricq.checkpoint.files import (
    CONFIG_NAME,
    QuantizedCheckpoint,
    expect_tensor,
    make_readable,
    read_safetensors,
    save_extras,
    write_config,
    write_safetensors,
)
from fabricq.checkpoint.model import model_config, unquantized_state_dict, validate
from fabricq.cli import json_type
from fabricq.errors import FabricqError
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.grid import SUPPORTED_BITS, QuantScheme, dequantize_groups
from fabricq.quant.packing import pack_int32, packed_width, unpack_int32

__all__ = ["save_compressed_checkpoint", "write_compressed", "read_compressed", "load_dequantized_state_dict"]

PACK_FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
# What the config says for fabricq's act-order modes ("dynamic" is written by hand, see above),
# and back.
CT_ACTORDER = {"none": None, "static": "weight", "dynamic": "group"}
ACTORDER_OF = {None: "none", "weight": "static", "group": "dynamic"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    validate(model, dict(model.named_modules()), quantized, scale_dtype=dtype)
    state_dict = unquantized_state_dict(model, quantized)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config = model_config(model, dtype or model.dtype)
    write_compressed(output_dir, config, state_dict, quantized, model, dtype, ignore=ignore,
                     max_shard_size=max_shard_size)
    save_extras(model, tokenizer, output_dir)
    make_readable(output_dir)


def write_compressed(output_dir: Path, config: dict, tensors: dict[str, torch.Tensor], quantized: dict, model,
                     scale_dtype: torch.dtype | None, *, ignore=None, max_shard_size="5GB") -> None:
    """Write a compressed-tensors checkpoint's weights and config.json: `config` (config.json without
    quantization_config), unquantized `tensors` as they are, the modules in `quantized` with their
    scales in `scale_dtype` (None: each module's weight dtype in `model`)."""
    modules = dict(model.named_modules()) if scale_dtype is None else {}
    state = dict(tensors)
    for name in sorted(quantized):
        state.update(compressed_tensors_for(name, quantized[name], scale_dtype or modules[name].weight.dtype))
    config = {**config, "quantization_config": build_quantization_config(model, quantized, ignore)}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, output_dir, max_shard_size)
    write_config(output_dir, config)


def compressed_tensors_for(name: str, qw: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        actorder=None if actorder == "dynamic" else CT_ACTORDER[actorder],
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


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def weights_for(module: str, config_groups: dict) -> dict:
    for group in config_groups.values():
        if any(_match(module, t) for t in group["targets"]):
            return group["weights"]
    # Class-name targets ("Linear") cannot be checked without the model: accept a lone one.
    by_class = [g for g in config_groups.values() if any(t.isidentifier() for t in g["targets"])]
    if len(by_class) == 1:
        return by_class[0]["weights"]
    raise ValueError(f"no config group of the checkpoint targets {module!r}")


def check_config_groups(qconfig: dict) -> dict:
    """quantization_config.config_groups as compressed-tensors writes it: {name: {"targets": [str],
    "weights": {...} or null}}, every "re:" target a valid regex; anything else a FabricqError."""
    groups = qconfig.get("config_groups")
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise FabricqError(f"quantization_config.config_groups is a JSON {json_type(groups)}, not an object of "
                           "config groups")
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise FabricqError(f"{where} is a JSON {json_type(group)}, not an object with targets and weights")
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise FabricqError(f"{where}.targets must be a list of module names or re: patterns, got {targets!r}"[:300])
        for target in targets:
            if target.startswith("re:"):
                try:
                    re.compile(target[3:])
                except re.error as err:
                    raise FabricqError(f"{where}.targets: {target!r} is not a valid regex ({err})") from None
        if not isinstance(group.get("weights"), (dict, type(None))):
            raise FabricqError(f"{where}.weights is a JSON {json_type(group['weights'])}, not an object")
    return {name: {**group, "weights": group.get("weights")} for name, group in groups.items()}


def scheme_for(module: str, qconfig: dict) -> QuantScheme:
    """The grid of `module` from its config group, every field checked."""
    try:
        args = weights_for(module, check_config_groups(qconfig))
    except ValueError as err:
        raise FabricqError(str(err)) from None
    if not isinstance(args, dict):
        raise FabricqError(f"quantization_config: the config group of {module} has no weights")
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise FabricqError(f"quantization_config weights for {module}: type {args.get('type')!r} strategy "
                           f"{args.get('strategy')!r} is not an integer group/channel scheme fabricq reads")
    if args.get("num_bits") not in SUPPORTED_BITS or isinstance(args.get("num_bits"), bool):
        raise FabricqError(f"quantization_config weights for {module}: num_bits {args.get('num_bits')!r} "
                           f"not one of {SUPPORTED_BITS}")
    if not isinstance(args.get("actorder"), (str, type(None))) or args.get("actorder") not in ACTORDER_OF:
        raise FabricqError(f"quantization_config weights for {module}: unknown actorder {args.get('actorder')!r}")
    if not isinstance(args.get("symmetric", True), bool):
        raise FabricqError(f"quantization_config weights for {module}: symmetric must be true or false, "
                           f"got {args.get('symmetric')!r}")
    group = -1 if args["strategy"] == "channel" else args.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group == 0 or group < -1:
        raise FabricqError(f"quantization_config weights for {module}: bad group_size {group!r}")
    return QuantScheme(args["num_bits"], group, bool(args.get("symmetric", True)), ACTORDER_OF[args.get("actorder")])


def read_compressed(tensors: dict, config: dict, shapes: dict) -> QuantizedCheckpoint:
    """Decode every compressed-tensors pack-quantized module among `tensors` (consumed)."""
    config = dict(config)
    qconfig = config.pop("quantization_config")
    if qconfig.get("format") != PACK_FORMAT:
        raise FabricqError(f"quantization_config.format {qconfig.get('format')!r}: fabricq reads pack-quantized only")
    quantized = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key.removesuffix(".weight_packed")
        if name not in shapes:
            raise FabricqError(f"tensor {key}: the model config has no Linear module {name}")
        scheme = scheme_for(name, qconfig)
        out, inp = shapes[name]
        if scheme.group_size != -1 and inp % scheme.group_size:
            raise FabricqError(f"quantization_config: group size {scheme.group_size} does not divide "
                               f"{name}'s {inp} columns")
        groups = scheme.groups_for(inp)
        for part in ("weight_shape", "weight_scale"):
            if f"{name}.{part}" not in tensors:
                raise FabricqError(f"missing tensor {name}.{part}")
        packed, shape = tensors.pop(key), tensors.pop(f"{name}.weight_shape")
        scale = tensors.pop(f"{name}.weight_scale")
        expect_tensor(f"{name}.weight_shape", shape, (2,), (torch.int64, torch.int32))
        if shape.tolist() != [out, inp]:
            raise FabricqError(f"tensor {name}.weight_shape is {shape.tolist()} but the config gives {[out, inp]}")
        expect_tensor(key, packed, (out, packed_width(inp, scheme.bits)), (torch.int32,))
        expect_tensor(f"{name}.weight_scale", scale, (out, groups), FLOAT_DTYPES)
        zero = torch.zeros(out, groups)
        if not scheme.symmetric:
            if f"{name}.weight_zero_point" not in tensors:
                raise FabricqError(f"missing tensor {name}.weight_zero_point (asymmetric scheme)")
            packed_zero = tensors.pop(f"{name}.weight_zero_point")
            expect_tensor(f"{name}.weight_zero_point", packed_zero, (packed_width(out, scheme.bits), groups),
                          (torch.int32,))
            zero = unpack_int32(packed_zero, scheme.bits, out, dim=0).float()
        contiguous = torch.arange(inp, dtype=torch.int32) // (inp if scheme.group_size == -1 else scheme.group_size)
        g_idx = tensors.pop(f"{name}.weight_g_idx", None)
        if scheme.actorder == "dynamic":
            if g_idx is None:
                raise FabricqError(f"missing tensor {name}.weight_g_idx (actorder 'group')")
            expect_tensor(f"{name}.weight_g_idx", g_idx, (inp,), (torch.int32,))
            if inp and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise FabricqError(f"tensor {name}.weight_g_idx has groups outside [0, {groups})")
        elif g_idx is not None:
            raise FabricqError(f"tensor {name}.weight_g_idx is present but the config's actorder is not 'group'")
        codes = unpack_int32(packed, scheme.bits, inp, dim=1)
        quantized[name] = QuantizedWeight(codes, scale.float(), zero, contiguous if g_idx is None else g_idx, scheme,
                                          {"scale_dtype": scale.dtype})
    for key in tensors:
        if key.rsplit(".", 1)[-1] in ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
            raise FabricqError(f"tensor {key} has no {key.rsplit('.', 1)[0]}.weight_packed beside it")
    return QuantizedCheckpoint(config, tensors, quantized, qconfig)


def load_dequantized_state_dict(checkpoint_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a pack-quantized checkpoint, quantized modules dequantized to `m.weight`."""
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / CONFIG_NAME).read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != QUANT_METHOD or qconfig.get("format") != PACK_FORMAT:
        raise ValueError(f"{checkpoint_dir} is not a compressed-tensors {PACK_FORMAT} checkpoint")
    tensors = read_safetensors(checkpoint_dir)
    suffix = ".weight_packed"
    for module in [n[: -len(suffix)] for n in tensors if n.endswith(suffix)]:
        args = weights_for(module, qconfig["config_groups"])
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
