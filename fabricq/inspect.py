"""`python -m fabricq.inspect CKPT [--engine vllm|tgi|transformers] [--tp N] [--json]`

Reads a quantized checkpoint (compressed-tensors pack-quantized, or the GPTQ format), checks
every tensor's name, shape and dtype against its config.json (the model is built on the meta
device from it: no weights are materialised), and prints the scheme per module group, act-order,
size on disk against the same model unquantized in the checkpoint's dtype, and each engine's
verdict with its reasons (`fabricq.serving`). Exit status: 0; 1 when `--engine` was given and
that engine fails on the checkpoint; 2 with one `fabricq: error: ...` line for a checkpoint
that cannot be read (missing/extra tensors, wrong shapes or dtypes, a truncated file, an unknown
format, a config that does not match the tensors).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from fabricq.cli import ArgumentParser, json_type, read_json_object, run_command
from fabricq.errors import FabricqError
from fabricq.gptq_format import QuantizedCheckpoint, expect_tensor, read_gptq
from fabricq.quant.gptq import QuantizedWeight
from fabricq.quant.grid import SUPPORTED_BITS, QuantScheme
from fabricq.quant.packing import packed_width, unpack_int32
from fabricq.serving import ENGINES, ModuleSpec, engine_verdict

CT_ACTORDER = {None: "none", "weight": "static", "group": "dynamic"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Checkpoint(QuantizedCheckpoint):
    fmt: str = ""
    path: Path = Path()
    meta_model: torch.nn.Module | None = None
    tensor_count: int = 0  # tensors in the files, all checked


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Reading, with every check
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return read_json_object(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors file(s); truncated or corrupt files and an
    index naming absent files or tensors are errors naming them."""
    from safetensors.torch import load_file

    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FabricqError(f"{index_path} has no weight_map")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or Path(filename).name != filename or filename in ("", ".", ".."):
                raise FabricqError(f"{index_path}: the weight_map puts {name} in {filename!r}, not the name of a file "
                                   "beside it")
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
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


def check_config_groups(qconfig: dict) -> dict:
    """quantization_config.config_groups as compressed-tensors writes it: {name: {"targets": [str],
    "weights": {...} or null}}, every "re:" target a valid regex; anything else a FabricqError."""
    import re

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


def _ct_args(module: str, qconfig: dict) -> QuantScheme:
    from fabricq.export import _weights_for

    try:
        args = _weights_for(module, check_config_groups(qconfig))
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
    if not isinstance(args.get("actorder"), (str, type(None))) or args.get("actorder") not in CT_ACTORDER:
        raise FabricqError(f"quantization_config weights for {module}: unknown actorder {args.get('actorder')!r}")
    if not isinstance(args.get("symmetric", True), bool):
        raise FabricqError(f"quantization_config weights for {module}: symmetric must be true or false, "
                           f"got {args.get('symmetric')!r}")
    group = -1 if args["strategy"] == "channel" else args.get("group_size")
    if not isinstance(group, int) or isinstance(group, bool) or group == 0 or group < -1:
        raise FabricqError(f"quantization_config weights for {module}: bad group_size {group!r}")
    return QuantScheme(args["num_bits"], group, bool(args.get("symmetric", True)), CT_ACTORDER[args.get("actorder")])


def read_compressed(tensors: dict, config: dict, shapes: dict) -> QuantizedCheckpoint:
    """Decode every compressed-tensors pack-quantized module among `tensors` (consumed)."""
    config = dict(config)
    qconfig = config.pop("quantization_config")
    if qconfig.get("format") != "pack-quantized":
        raise FabricqError(f"quantization_config.format {qconfig.get('format')!r}: fabricq reads pack-quantized only")
    quantized = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key.removesuffix(".weight_packed")
        if name not in shapes:
            raise FabricqError(f"tensor {key}: the model config has no Linear module {name}")
        scheme = _ct_args(name, qconfig)
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
    config = _read_json(path / "config.json")
    fmt = detect_format(config)
    model = meta_model(config)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    tensors = read_tensors(path)
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
            raise FabricqError(f"tensor {key} is {_name(tensor.dtype)}, expected a {kind} dtype")
    missing = sorted(set(expected) - set(checkpoint.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FabricqError(f"missing tensor {missing[0]}{more}")
    return Checkpoint(checkpoint.config, checkpoint.tensors, checkpoint.quantized, checkpoint.quantization_config,
                      fmt=fmt, path=path, meta_model=model, tensor_count=count)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    name = checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype")
    if name in ("float16", "bfloat16", "float32"):
        return getattr(torch, name)
    floats = [t.dtype for t in checkpoint.tensors.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def specs_of(checkpoint: Checkpoint) -> list[ModuleSpec]:
    return [ModuleSpec(n, *qw.shape, qw.scheme.bits, qw.scheme.group_size, qw.scheme.symmetric, qw.scheme.actorder)
            for n, qw in checkpoint.quantized.items()]


def inspect_checkpoint(path, engines=None, tp: int = 1) -> dict:
    """Everything the command prints, as a dict (`verdicts` as serving.Verdict objects)."""
    checkpoint = load_checkpoint(path)
    dtype = checkpoint_dtype(checkpoint)
    specs = specs_of(checkpoint)
    groups: dict[tuple, list[str]] = defaultdict(list)
    for spec in specs:
        groups[(spec.suffix, spec.bits, spec.symmetric, spec.group_size, spec.actorder)].append(spec.name)
    files = sorted(f for f in checkpoint.path.iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    params = remove_tied_weights_from_state_dict(checkpoint.meta_model.state_dict(), checkpoint.meta_model)
    unquantized = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                      for t in params.values())
    linear = [n for n, m in checkpoint.meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.fmt,
        "dtype": _name(dtype),
        "quantized_modules": len(specs),
        "unquantized_linear": [n for n in linear if n not in checkpoint.quantized],
        "schemes": [{"modules": suffix, "count": len(names), "bits": bits, "symmetric": sym, "group_size": group,
                     "actorder": actorder} for (suffix, bits, sym, group, actorder), names in sorted(groups.items())],
        "tensors_checked": checkpoint.tensor_count,
        "size_bytes": size,
        "unquantized_bytes": unquantized,
        "ratio": size / unquantized if unquantized else float("nan"),
        "tp": tp,
        "verdicts": [engine_verdict(e, checkpoint.fmt, specs, dtype, tp) for e in (engines or ENGINES[1:])],
    }


def format_report(report: dict) -> str:
    mib = 1 << 20
    lines = [
        f"checkpoint: {report['path']}",
        f"format: {report['format']}    dtype: {report['dtype']}",
        f"quantized: {report['quantized_modules']} Linear modules; unquantized: "
        f"{', '.join(report['unquantized_linear']) or 'none'}",
        "schemes:",
    ]
    for s in report["schemes"]:
        group = "per-channel" if s["group_size"] == -1 else f"group {s['group_size']}"
        lines.append(f"  {s['modules']} ({s['count']}): {s['bits']}-bit {'sym' if s['symmetric'] else 'asym'}, "
                     f"{group}, act-order {s['actorder']}")
    lines += [
        f"size on disk: {report['size_bytes'] / mib:.2f} MiB; unquantized in {report['dtype']}: "
        f"{report['unquantized_bytes'] / mib:.2f} MiB; ratio {report['ratio']:.3f}",
        f"tensors: every one present with the shape and dtype the config implies ({report['tensors_checked']} checked)",
        f"verdicts (tp={report['tp']}):",
    ]
    lines += ["  " + v.line().replace("\n", "\n  ") for v in report["verdicts"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m fabricq.inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint")
    parser.add_argument("--engine", choices=ENGINES[1:], help="only this engine's verdict (exit 1 if it fails)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check shards for")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.tp < 1:
            raise FabricqError(f"--tp must be a positive integer, got {args.tp}")
        report = inspect_checkpoint(args.checkpoint, [args.engine] if args.engine else None, args.tp)
        if args.json:
            print(json.dumps({**report, "verdicts": [v.__dict__ for v in report["verdicts"]]}, indent=2))
        else:
            print(format_report(report))
        return 1 if args.engine and report["verdicts"][0].level == "fails" else 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
