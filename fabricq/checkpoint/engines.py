"""What serving engines accept, checked before calibration (pre-flight) and on a written
checkpoint (`python -m fabricq.inspect`), and the export dtype and formats they are checked for.

One table of rules, applied to `ModuleSpec`s: a module's shape and grid, from a config plus the
model's Linear shapes before calibration, or from a checkpoint's tensors afterwards. Each rule
gives a level per module: "fails" (the engine refuses the checkpoint or cannot shard it),
"warn" (it loads, on a slower kernel path or with a cast) or nothing. The rules are fabricq's
summary of the engines' documented kernel limits (vLLM's Marlin/GPTQ kernels and compressed-tensors
W4A16/W8A16, TGI's GPTQ loaders, transformers through compressed-tensors or GPTQModel); they are
not a substitute for loading the checkpoint in the engine.

Tensor parallelism shards column-parallel modules (q/k/v/gate/up) by output rows and
row-parallel ones (o_proj/down_proj) by input columns: a row-parallel shard holds in/tp columns,
which must be a whole number of groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fabricq.errors import FabricqError
from fabricq.quant.grid import QuantScheme, effective_group_size

FORMATS = ("compressed-tensors", "gptq", "both")
FORMAT_ALIASES = {"compressed_tensors": "compressed-tensors"}
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENGINES = ("none", "vllm", "tgi", "transformers")
GPTQ_SUBDIR = "gptq"  # export.format=both: the GPTQ copy lives in this subfolder of the output

# Module-name endings of the row-parallel projections (input columns sharded across ranks).
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense", "w2", "wo")
# Projections of KV heads: engines replicate them when tp exceeds the KV head count.
KV_PROJ = ("k_proj", "v_proj")
MARLIN_GROUPS = (-1, 32, 64, 128)
MARLIN_TILE_N, MARLIN_TILE_K = 64, 128  # smallest output / input shard Marlin kernels tile


@dataclass(frozen=True)
class ModuleSpec:
    """One quantized Linear as an engine sees it: (out_features, in_features) and its grid."""

    name: str
    out_features: int
    in_features: int
    bits: int
    group_size: int  # -1: one scale per output row
    symmetric: bool
    actorder: str  # none | static | dynamic

    @property
    def row_parallel(self) -> bool:
        return self.name.rsplit(".", 1)[-1] in ROW_PARALLEL

    @property
    def suffix(self) -> str:
        """The name relative to its decoder layer ("mlp.down_proj"), used to group reports."""
        parts = self.name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        return ".".join(parts[digits[-1] + 1 :]) if digits else self.name


@dataclass
class Verdict:
    """An engine's verdict on one format: "ok", "warn" or "fails", with the reasons."""

    engine: str
    fmt: str
    level: str = "ok"
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{self.engine} ({self.fmt}): {self.level.upper() if self.level != 'ok' else 'ok'}"
        return head if not self.reasons else head + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


_LEVELS = {"ok": 0, "warn": 1, "fails": 2}


def canonical_format(name) -> str:
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise FabricqError(f"export.format must be one of {FORMATS}, got {name!r}")
    return name


def written_formats(fmt: str) -> tuple[str, ...]:
    fmt = canonical_format(fmt)
    return ("compressed-tensors", "gptq") if fmt == "both" else (fmt,)


def resolve_export_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto`: the model's dtype, except a float32 model is written in bfloat16 (float32 doubles
    every unquantized tensor, and engines cast it at load: vLLM to float16)."""
    if name == "auto":
        return torch.bfloat16 if model_dtype == torch.float32 else model_dtype
    if name not in EXPORT_DTYPES:
        raise FabricqError(f"export.dtype must be auto or one of {sorted(EXPORT_DTYPES)}, got {name!r}")
    return EXPORT_DTYPES[name]


def scale_dtype_for(fmt: str, export_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are rounded to while quantizing, so that every written format stores them
    exactly and a loader computing in the export dtype reads them unchanged. compressed-tensors
    stores scales in the export dtype, the GPTQ format in float16: a bfloat16 export rounds them to
    bfloat16, whose values are float16 values too (from 2^-17 up: 8 significant bits fit in
    float16's 11), so GPTQModel running in bfloat16 casts them back exactly."""
    if export_dtype in (torch.bfloat16, torch.float16) or "gptq" not in written_formats(fmt):
        return export_dtype
    return torch.float16


def check_export_config(export, quant) -> None:
    """Cheap checks of the export fields against the quantization fields (no model needed)."""
    formats = written_formats(getattr(export, "format", "compressed-tensors"))
    resolve_export_dtype(getattr(export, "dtype", "auto"), torch.float32)
    engine = getattr(export, "engine", "none")
    if engine not in ENGINES:
        raise FabricqError(f"export.engine must be one of {ENGINES}, got {engine!r}")
    tp = getattr(export, "tp", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise FabricqError(f"export.tp must be a positive integer, got {tp!r}")
    if quant.actorder == "dynamic" and "compressed-tensors" in formats:
        raise FabricqError(
            "quant.actorder=dynamic stores act-order groups (g_idx) that compressed-tensors >= 0.19 refuses "
            "(its actorder 'group' was removed), so transformers and vLLM could not load the checkpoint: use "
            "quant.actorder=static (groups stay contiguous), quant.actorder=folded (act-order folded into the "
            "weights, groups contiguous), or export.format=gptq (desc_act with g_idx)"
        )


def module_specs(shapes: dict[str, tuple[int, int]], scheme: QuantScheme) -> list[ModuleSpec]:
    """Specs of modules (name → (out, in)) quantized with `scheme`, with fabricq's per-module
    group-size fallback applied."""
    return [
        ModuleSpec(name, out, inp, scheme.bits, effective_group_size(scheme.group_size, inp),
                   # folded act-order writes contiguous groups, as static does
                   scheme.symmetric, "static" if scheme.actorder == "folded" else scheme.actorder)
        for name, (out, inp) in shapes.items()
    ]


def gptq_layout_problem(spec: ModuleSpec) -> str | None:
    """Why the GPTQ format cannot store this module, or None. qweight packs 32/bits input
    columns per int32 word (3 bits: 32 columns in 3 words) and qzeros 32/bits output rows."""
    unit = _pack_unit(spec.bits)
    if spec.in_features % unit or spec.out_features % unit:
        return (f"{spec.name}: the GPTQ format packs {unit} {spec.bits}-bit codes per "
                f"{'3 words' if spec.bits == 3 else 'int32 word'}; shape (out={spec.out_features}, "
                f"in={spec.in_features}) is not a multiple of {unit}")
    if spec.group_size != -1 and spec.in_features % spec.group_size:
        return f"{spec.name}: group size {spec.group_size} does not divide {spec.in_features} input columns"
    return None


# ---------------------------------------------------------------------------------------------
# The rules: spec → list of (level, reason) for one engine and format
# ---------------------------------------------------------------------------------------------


def _shard_problems(spec: ModuleSpec, tp: int, fmt: str) -> list[tuple[str, str]]:
    if tp == 1:
        return []
    out = []
    if spec.row_parallel:
        if spec.in_features % tp:
            return [("fails", f"{spec.in_features} input columns do not split over tp={tp}")]
        shard = spec.in_features // tp
        if spec.group_size != -1 and shard % spec.group_size:
            out.append(("fails", f"group size {spec.group_size} does not divide the tensor-parallel shard "
                                 f"{spec.in_features}/{tp}={shard} input columns"))
        if shard % _pack_unit(spec.bits):
            out.append(("fails", f"the shard of {shard} input columns splits packed int32 words "
                                 f"({_pack_unit(spec.bits)} codes)"))
        if spec.actorder == "dynamic":
            out.append(("warn", "act-order g_idx on a row-parallel layer: activations are gathered across ranks "
                                "in act-order (slow path)"))
    elif spec.name.rsplit(".", 1)[-1] not in KV_PROJ:
        if spec.out_features % tp:
            return [("fails", f"{spec.out_features} output rows do not split over tp={tp}")]
        # zero points (GPTQ qzeros always, compressed-tensors when asymmetric) are packed along the rows
        if (fmt == "gptq" or not spec.symmetric) and (spec.out_features // tp) % _pack_unit(spec.bits):
            out.append(("fails", f"the shard of {spec.out_features // tp} output rows splits the packed zero points"))
    return out


def _pack_unit(bits: int) -> int:
    """Codes per whole number of int32 words: a shard boundary must fall between words."""
    return 32 if bits == 3 else 32 // bits


def _marlin_problems(spec: ModuleSpec, tp: int) -> list[tuple[str, str]]:
    """Where vLLM/TGI's Marlin kernels do not apply, so a slower kernel must be found."""
    out = []
    if spec.group_size not in MARLIN_GROUPS:
        out.append(("warn", f"group size {spec.group_size} is not one Marlin kernels take {MARLIN_GROUPS}"))
    k = spec.in_features // tp if spec.row_parallel else spec.in_features
    n = spec.out_features if spec.row_parallel else spec.out_features // max(1, tp)
    if k % MARLIN_TILE_K or n % MARLIN_TILE_N:
        out.append(("warn", f"shard (out={n}, in={k}) is not a multiple of Marlin's {MARLIN_TILE_N}x{MARLIN_TILE_K} "
                            "tile: a slower kernel is used"))
    return out


def _vllm(spec: ModuleSpec, fmt: str, tp: int) -> list[tuple[str, str]]:
    out = _shard_problems(spec, tp, fmt)
    if fmt == "compressed-tensors":
        if spec.bits not in (4, 8):
            return out + [("fails", f"{spec.bits}-bit weights: vLLM's compressed-tensors W4A16/W8A16 kernels "
                                    "take 4 or 8 bits")]
        if not spec.symmetric and spec.bits != 4:
            return out + [("fails", f"asymmetric {spec.bits}-bit: vLLM takes zero points for 4-bit weights only")]
        if spec.actorder == "dynamic":
            return out + [("fails", "actorder 'group' (g_idx) is refused by compressed-tensors >= 0.19")]
        return out + _marlin_problems(spec, tp)
    if spec.symmetric and spec.bits in (4, 8):
        return out + _marlin_problems(spec, tp)
    return out + [("warn", f"{'asymmetric' if not spec.symmetric else 'symmetric'} {spec.bits}-bit GPTQ: no Marlin "
                           "kernel, served by the older GPTQ kernel")]


def _tgi(spec: ModuleSpec, fmt: str, tp: int) -> list[tuple[str, str]]:
    out = _shard_problems(spec, tp, fmt)
    if fmt == "compressed-tensors":
        if spec.bits not in (4, 8) or not spec.symmetric:
            return out + [("fails", f"{'asymmetric ' if not spec.symmetric else ''}{spec.bits}-bit: TGI's "
                                    "compressed-tensors loader takes symmetric W4A16/W8A16")]
        if spec.actorder == "dynamic":
            return out + [("fails", "actorder 'group' (g_idx) is refused by compressed-tensors >= 0.19")]
        return out + _marlin_problems(spec, tp)
    if spec.bits != 4:
        return out + [("warn", f"{spec.bits}-bit GPTQ: TGI's exllama/Marlin kernels take 4 bits; a Triton kernel "
                               "serves the rest")]
    return out + _marlin_problems(spec, tp)


def _transformers(spec: ModuleSpec, fmt: str, tp: int) -> list[tuple[str, str]]:
    if fmt == "compressed-tensors":
        if spec.actorder == "dynamic":
            return [("fails", "actorder 'group' (g_idx) is refused by compressed-tensors >= 0.19")]
        if not spec.symmetric:
            return [("warn", "asymmetric: compressed-tensors 0.20 expects unpacked zero points on a plain load; "
                             "load with CompressedTensorsConfig(dequantize=True) (llm-compressor#1618)")]
        return []
    if not spec.symmetric:
        return [("fails", "asymmetric GPTQ v1: GPTQModel (transformers' GPTQ loader) refuses sym=false checkpoints "
                          "not written by gptqmodel >= 0.9 (its guard against old zero-point bugs)")]
    return [("warn", "transformers loads the GPTQ format only with the gptqmodel package installed")]


_RULES = {"vllm": _vllm, "tgi": _tgi, "transformers": _transformers}


def engine_verdict(engine: str, fmt: str, specs: list[ModuleSpec], dtype: torch.dtype, tp: int = 1) -> Verdict:
    """The engine's verdict on a checkpoint in `fmt` holding `specs`, unquantized tensors in
    `dtype`. Each reason names the module suffixes it applies to and how many modules."""
    verdict = Verdict(engine, fmt)
    by_reason: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for spec in specs:
        for level, reason in _RULES[engine](spec, fmt, tp):
            by_reason[(level, reason)][spec.suffix] += 1
    groups = {s.group_size for s in specs}
    if fmt == "gptq" and len(groups) > 1 and engine == "tgi":
        by_reason[("fails", f"group sizes {sorted(groups)} differ per module: TGI reads one group_size "
                            "(no per-module `dynamic` overrides)")]
    if dtype == torch.float32 and engine in ("vllm", "tgi"):
        by_reason[("warn", "float32 checkpoint: the weight-only kernels run in float16/bfloat16; vLLM's "
                           "dtype=auto casts it to float16")]
    if engine == "transformers" and tp > 1:
        by_reason[("warn", f"tp={tp} not checked for transformers")]
    for (level, reason), suffixes in sorted(by_reason.items(), key=lambda kv: (-_LEVELS[kv[0][0]], kv[0][1])):
        count = sum(suffixes.values())
        where = f"{', '.join(sorted(suffixes))} ({count} module{'s' if count > 1 else ''}): " if suffixes else ""
        verdict.reasons.append(f"[{level}] {where}{reason}")
        if _LEVELS[level] > _LEVELS[verdict.level]:
            verdict.level = level
    return verdict


def preflight(export, scheme: QuantScheme, shapes: dict[str, tuple[int, int]], model_dtype: torch.dtype,
              ignore: tuple[str, ...] = ()) -> list[Verdict]:
    """Before calibration: can the configured formats store these modules, and (with
    export.engine set) will the engine serve the result at export.tp? Raises FabricqError on the
    first format it cannot write, and when no written format is servable by the engine."""
    patterns = [re.compile(p) for p in ignore]
    shapes = {n: s for n, s in shapes.items() if not any(p.search(n) for p in patterns)}
    specs = module_specs(shapes, scheme)
    formats = written_formats(getattr(export, "format", "compressed-tensors"))
    if "gptq" in formats:
        for spec in specs:
            problem = gptq_layout_problem(spec)
            if problem:
                raise FabricqError(f"export.format={getattr(export, 'format')} cannot store {problem} (export "
                                   "compressed-tensors, or leave such modules out with quant.ignore)")
    engine = getattr(export, "engine", "none")
    if engine == "none":
        return []
    dtype = resolve_export_dtype(getattr(export, "dtype", "auto"), model_dtype)
    verdicts = [engine_verdict(engine, fmt, specs, dtype, getattr(export, "tp", 1)) for fmt in formats]
    if all(v.level == "fails" for v in verdicts):
        first = next(r for r in verdicts[0].reasons if r.startswith("[fails]"))
        raise FabricqError(
            f"export.engine={engine} export.tp={getattr(export, 'tp', 1)} cannot serve this config "
            f"({verdicts[0].fmt}): {first.removeprefix('[fails] ')} — change the quantization, or set "
            "export.engine=none to export anyway"
        )
    return verdicts
