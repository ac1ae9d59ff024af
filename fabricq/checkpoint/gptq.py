"""The GPTQ checkpoint format (v1, as GPTQModel and AutoGPTQ write it): writer and reader.

For each quantized Linear `m` with `out` output rows and `inp` input columns, `g` groups:
  `m.qweight` int32 (inp·bits/32, out): unsigned codes q = code + 2^(b-1), packed along the
              input dimension, least significant bits first. 2/4/8 bits: 32/bits codes per word;
              3 bits: the dense layout, 32 codes in 3 words, codes straddling word boundaries.
  `m.qzeros`  int32 (g, out·bits/32): the zero point minus one ("v1": z - 1 with
              z = zero + 2^(b-1); symmetric grids have z = 2^(b-1)), packed along the output
              dimension the same way.
  `m.scales`  float16 (g, out).
  `m.g_idx`   int32 (inp,): each input column's group (i // group_size unless act-order is dynamic).
  `m.bias`    as the model holds it.
A weight dequantizes as W[o, i] = scales[g_idx[i], o] · (q[i, o] - (qzeros[g_idx[i], o] + 1)).

Both packings are the dense bit stream of `fabricq.quant.packing` (qweight is the transpose of the
compressed-tensors `weight_packed`), so nothing is re-quantized. The v1 convention cannot store a
zero point z = 0 (z - 1 = -1 does not fit in b bits, and GPTQModel's whole-word v1→v2 conversion
and per-code readers such as vLLM's disagree on it): a group with z = 0 whose codes stay below the
top code is stored exactly as codes + 1 with z = 1; any other such group is refused.

config.json gets `quantization_config` and the same dict goes to quantize_config.json:
quant_method "gptq", checkpoint_format "gptq", bits, group_size, sym, desc_act (true only for
dynamic act-order, where g_idx is not contiguous), lm_head false, and, where modules differ from
the most common scheme, GPTQModel's per-module `dynamic` overrides ("+:regex": {fields}), with
"-:regex" for Linear modules of decoder layers left unquantized. fabricq's act-order mode goes
under `meta`, so a converter can tell "static" from "none" (the grids are the same).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch

from fabricq import __version__
from fabricq.checkpoint.engines import gptq_layout_problem, module_specs
from fabricq.checkpoint.files import (
    QuantizedCheckpoint,
    expect_tensor,
    make_readable,
    save_extras,
    write_config,
    write_safetensors,
)
from fabricq.checkpoint.model import model_config, unquantized_state_dict, validate
from fabricq.errors import FabricqError
from fabricq.quant.gptq import QuantizedWeight
from fabricq.quant.grid import QuantScheme
from fabricq.quant.packing import pack_int32, unpack_int32

__all__ = ["save_gptq_checkpoint", "write_gptq", "read_gptq", "gptq_tensors", "build_gptq_config"]

QUANTIZE_CONFIG_NAME = "quantize_config.json"
TENSORS = ("qweight", "qzeros", "scales", "g_idx")
SCALE_DTYPE = torch.float16


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _exact_in(values: torch.Tensor, dtype: torch.dtype) -> bool:
    values = values.float()
    return bool(torch.equal(values.to(dtype).float(), values))


def gptq_tensors(name: str, qw) -> dict[str, torch.Tensor]:
    """`qweight`, `qzeros`, `scales` and `g_idx` of one module (QuantizedWeight or packed)."""
    scheme = qw.scheme
    rows, cols = qw.shape
    codes, zero = qw.codes.cpu(), qw.zero.cpu()
    if not _exact_in(qw.scale, SCALE_DTYPE):
        raise FabricqError(
            f"{name}: scales are not exactly representable in float16, the GPTQ format's scale dtype "
            "(quantize with float16-representable scales; converting would re-quantize)"
        )
    if not scheme.symmetric and bool((zero == scheme.qmin).any()):
        codes, zero = _lift_zero_points(name, codes, zero, qw.g_idx.cpu(), scheme)
    qweight = pack_int32(codes.to(torch.int8), scheme.bits, dim=1).T.contiguous()
    # (zero - 1) as a signed code is stored as zero - 1 + 2^(b-1) = z - 1.
    qzeros = pack_int32((zero - 1).to(torch.int8).T.contiguous(), scheme.bits, dim=1)
    return {
        f"{name}.qweight": qweight,
        f"{name}.qzeros": qzeros,
        f"{name}.scales": qw.scale.T.to(SCALE_DTYPE).contiguous(),
        f"{name}.g_idx": qw.g_idx.cpu().to(torch.int32).contiguous(),
    }


def _lift_zero_points(name, codes, zero, g_idx, scheme):
    """Groups with zero point z = 0 stored as codes + 1 and z = 1: the same weights, when no code
    of the group is the top one."""
    low = zero == scheme.qmin  # (rows, groups)
    per_column = low.index_select(1, g_idx.long())
    if bool((per_column & (codes == scheme.qmax)).any()):
        raise FabricqError(
            f"{name}: a group has zero point 0 and uses the top code, which the GPTQ v1 format cannot store "
            "(its zero points are stored minus one): export this model as compressed-tensors"
        )
    return codes + per_column.to(codes.dtype), zero + low.to(zero.dtype)


def _scheme_fields(scheme: QuantScheme) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric,
            "desc_act": scheme.actorder == "dynamic"}


def _layer_regex(name: str) -> str | None:
    """"model.layers.3.mlp.down_proj" → a regex for that suffix in every layer; None outside layers."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return None
    return r".*\." + r"\.".join(re.escape(p) for p in parts[digits[-1] + 1 :]) + "$"


def build_gptq_config(quantized: dict, linear_names: list[str]) -> dict:
    """The `quantization_config` (and quantize_config.json) for `quantized` among a model's
    Linear modules `linear_names`."""
    schemes = {name: qw.scheme for name, qw in quantized.items()}
    counts = Counter(schemes.values())
    base = max(counts, key=lambda s: (counts[s], s.bits, s.group_size))
    dynamic = {}
    differing = sorted(n for n, s in schemes.items() if s != base)
    for name in differing:
        regex = _layer_regex(name)
        selected = [n for n in linear_names if regex and re.match(regex, n)]
        if regex is None or any(schemes.get(n) != schemes[name] for n in selected):
            regex = "^" + re.escape(name) + "$"
        fields = _scheme_fields(schemes[name])
        dynamic[f"+:{regex}"] = {k: v for k, v in fields.items() if v != _scheme_fields(base)[k]}
    for name in linear_names:
        if name not in quantized and _layer_regex(name) is not None:
            dynamic[f"-:^{re.escape(name)}$"] = {}
    actorders = sorted({s.actorder for s in schemes.values()})
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        **_scheme_fields(base),
        "lm_head": False,
        "pack_dtype": "int32",
        "true_sequential": True,
        "meta": {"quantizer": [f"fabricq:{__version__}"], "fabricq_actorder": actorders[0] if len(actorders) == 1
                 else base.actorder},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def write_gptq(output_dir: Path, config: dict, tensors: dict[str, torch.Tensor], quantized: dict,
               linear_names: list[str], max_shard_size="5GB") -> None:
    """Write a GPTQ checkpoint: `config` (config.json without quantization_config), unquantized
    `tensors` as they are, and the modules in `quantized`."""
    state = dict(tensors)
    for name in sorted(quantized):
        state.update(gptq_tensors(name, quantized[name]))
    qconfig = build_gptq_config(quantized, linear_names)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, output_dir, max_shard_size)
    write_config(output_dir, {**config, "quantization_config": qconfig})
    write_config(output_dir, qconfig, QUANTIZE_CONFIG_NAME)
    make_readable(output_dir, files_only=True)


def save_gptq_checkpoint(model, quantized: dict, output_dir: Path, tokenizer=None, *,
                         dtype: torch.dtype | None = None, max_shard_size="5GB") -> None:
    """Write `model` with the modules in `quantized` in the GPTQ format; unquantized tensors in
    `dtype` (default: the model's)."""
    dtype = dtype or model.dtype
    modules = dict(model.named_modules())
    validate(model, modules, quantized, scale_dtype=SCALE_DTYPE)
    for name, qw in quantized.items():
        rows, cols = qw.shape
        problem = gptq_layout_problem(module_specs({name: (rows, cols)}, qw.scheme)[0])
        if problem:
            raise FabricqError(f"GPTQ format: {problem}")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v
               for k, v in unquantized_state_dict(model, quantized).items()}
    config = model_config(model, dtype)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    write_gptq(Path(output_dir), config, tensors, quantized, linear_names, max_shard_size)
    save_extras(model, tokenizer, output_dir)
    make_readable(Path(output_dir), files_only=True)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _scheme_for(name: str, qconfig: dict, actorder: str) -> QuantScheme | None:
    fields = {k: qconfig.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
    dynamic = qconfig.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise FabricqError(f"quantization_config.dynamic must be an object of regex: overrides, got {dynamic!r}"[:300])
    for pattern, override in dynamic.items():
        sign, regex = (pattern[0], pattern[2:]) if pattern[:2] in ("+:", "-:") else ("+", pattern)
        if not isinstance(override, dict):
            raise FabricqError(f"quantization_config.dynamic[{pattern!r}] must be an object of fields, got {override!r}"[:300])
        try:
            matched = re.match(regex, name)
        except re.error as err:
            raise FabricqError(f"quantization_config.dynamic: {pattern!r} is not a valid regex ({err})") from None
        if matched:
            if sign == "-":
                return None
            fields.update({k: v for k, v in override.items() if k in fields})
            break
    for key, kind in (("bits", int), ("group_size", int), ("sym", bool), ("desc_act", bool)):
        if not isinstance(fields[key], kind) or (kind is int and isinstance(fields[key], bool)):
            raise FabricqError(f"quantization_config.{key} of {name} must be {kind.__name__}, got {fields[key]!r}")
    try:
        return QuantScheme(fields["bits"], fields["group_size"], fields["sym"],
                           "dynamic" if fields["desc_act"] else actorder)
    except ValueError as err:
        raise FabricqError(f"quantization_config for {name}: {err}") from None


def decode_gptq_module(name: str, tensors: dict, scheme: QuantScheme, out_features: int,
                       in_features: int) -> QuantizedWeight:
    """Pop `name`'s GPTQ tensors, check their shapes and dtypes, return its codes and grid."""
    missing = [f"{name}.{t}" for t in ("qweight", "qzeros", "scales") if f"{name}.{t}" not in tensors]
    if missing:
        raise FabricqError(f"missing tensor {missing[0]}")
    bits = scheme.bits
    unit = 32 if bits == 3 else 32 // bits
    if in_features % unit or out_features % unit:
        raise FabricqError(f"{name}: shape (out={out_features}, in={in_features}) from the config does not fill "
                           f"whole GPTQ {bits}-bit words (multiples of {unit})")
    groups = scheme.groups_for(in_features)
    qweight, qzeros, scales = (tensors.pop(f"{name}.{t}") for t in ("qweight", "qzeros", "scales"))
    g_idx = tensors.pop(f"{name}.g_idx", None)
    expect_tensor(f"{name}.qweight", qweight, (in_features * bits // 32, out_features), (torch.int32,))
    expect_tensor(f"{name}.qzeros", qzeros, (groups, out_features * bits // 32), (torch.int32,))
    expect_tensor(f"{name}.scales", scales, (groups, out_features), (torch.float16, torch.bfloat16, torch.float32))
    contiguous = torch.arange(in_features, dtype=torch.int32) // (in_features if scheme.group_size == -1
                                                                  else scheme.group_size)
    if g_idx is None:
        g_idx = contiguous
    expect_tensor(f"{name}.g_idx", g_idx, (in_features,), (torch.int32, torch.int64))
    if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FabricqError(f"tensor {name}.g_idx has groups outside [0, {groups})")
    if scheme.actorder != "dynamic" and not torch.equal(g_idx.to(torch.int32), contiguous):
        raise FabricqError(f"tensor {name}.g_idx is not contiguous groups of {scheme.group_size} but desc_act is false")
    codes = unpack_int32(qweight.T.contiguous(), bits, in_features, dim=1)
    zero = unpack_int32(qzeros, bits, out_features, dim=1).T.float() + 1
    if bool((zero > scheme.qmax).any()):
        raise FabricqError(f"tensor {name}.qzeros stores a zero point of 0 (2^{bits}-1 minus one), which GPTQ v1 "
                           "readers disagree on: not read")
    if scheme.symmetric and bool((zero != 0).any()):
        raise FabricqError(f"tensor {name}.qzeros is not 2^{bits - 1}-1 everywhere but the config says sym=true")
    return QuantizedWeight(codes, scales.T.float().contiguous(), zero.contiguous(), g_idx.to(torch.int32),
                           scheme)


def read_gptq(tensors: dict[str, torch.Tensor], config: dict,
              shapes: dict[str, tuple[int, int]]) -> QuantizedCheckpoint:
    """Decode every module with a `qweight` among `tensors` (consumed); `shapes` gives each
    Linear's (out, in) from the model config. Everything is checked against the config."""
    config = dict(config)
    qconfig = config.pop("quantization_config")
    meta = qconfig.get("meta")
    actorder = meta.get("fabricq_actorder", "none") if isinstance(meta, dict) else "none"
    if actorder not in ("none", "static"):
        actorder = "none"
    quantized = {}
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        name = key.removesuffix(".qweight")
        if name not in shapes:
            raise FabricqError(f"tensor {key}: the model config has no Linear module {name}")
        scheme = _scheme_for(name, qconfig, actorder)
        if scheme is None:
            raise FabricqError(f"tensor {key}: quantization_config.dynamic excludes {name} from quantization")
        quantized[name] = decode_gptq_module(name, tensors, scheme, *shapes[name])
    for key in tensors:
        if key.rsplit(".", 1)[-1] in TENSORS:
            raise FabricqError(f"tensor {key} has no {key.rsplit('.', 1)[0]}.qweight beside it")
    return QuantizedCheckpoint(config, tensors, quantized, qconfig)

