"""The config schema: one frozen dataclass per config group, every user-facing field checked here.

Hydra composes `conf/` and the command line into a DictConfig; `load_settings` checks it once and
returns `Settings`, the typed object the rest of fabricq reads. The YAML files under `conf/` say
what each field means; the defaults below equal theirs (tests/test_config.py compares them).

The schema is not registered with Hydra as a structured config on purpose: OmegaConf converts
values into a typed field (`overwrite=no` becomes False, `quant.bits=4.0` becomes 4), while fabricq
refuses anything but the literal type, with one line naming the field and what it accepts.

To add a field: give it a default and a rule (`setting(default, check)`) in its group's class, and
the same default in the group's YAML file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fabricq.errors import FabricqError

Check = Callable[[Any, str], Any]  # (value, "group.field") -> the value, or raise FabricqError

SUPPORTED_BITS = (2, 3, 4, 8)
ACTORDERS = ("none", "static", "dynamic", "folded")
METHODS = ("gptq", "rtn")
HESSIAN_DTYPES = ("float32", "float64")
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the names fabricq.models.DTYPES maps to torch dtypes
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
HEAP_POLICIES = ("compact", "fast")
EXPORT_FORMATS = ("compressed-tensors", "compressed_tensors", "gptq", "both")
MAX_GROUP_SIZE = 1 << 20  # columns: wider than any layer; a larger request is refused, not clamped

# Fields of earlier releases: naming one is an error that says what became of it.
_GONE = {
    "pipeline.lag": "every layer is calibrated on the quantized outputs of the layer before it",
    "pipeline.prefetch": "prefetching is always on",
    "trainer.solve_window": "it only applied to the lagged pipeline, which is gone",
    "trainer.hessian_upper_triangle": "it is no longer an option",
    "trainer.balance": "measured solve times always plan the next layers",
}
_MOVED = {"trainer.timeout_s": "distributed.timeout_s", "trainer.cpu_oversubscribe": "distributed.cpu_oversubscribe"}
REMOVED = {**{key: f"{key} was removed ({why}): drop it from the command line" for key, why in _GONE.items()},
           **{key: f"{key} moved to {new}" for key, new in _MOVED.items()}}


# Rules: each returns a Check that accepts only the literal type (no bool for int, no 4.0 for 4).

def one_of(*options, what: str | None = None) -> Check:
    def check(value, key):
        if not any(type(value) is type(o) and value == o for o in options):
            raise FabricqError(f"{key} must be {what or f'one of {options}'}, got {value!r}")
        return value
    return check


def boolean(value, key):
    if type(value) is not bool:
        raise FabricqError(f"{key} must be true or false, got {value!r}")
    return value


def integer(minimum: int, what: str, also: tuple[int, ...] = (), maximum: int | None = None, why: str = "") -> Check:
    def check(value, key):
        if type(value) is not int or (value < minimum and value not in also):
            raise FabricqError(f"{key} must be {what}, got {value!r}")
        if maximum is not None and value > maximum:
            raise FabricqError(f"{key} must be at most {maximum}{why}, got {value!r}")
        return value
    return check


def number(what: str, above: float | None = None, at_least: float | None = None, below: float | None = None,
           maximum: int | None = None, why: str = "") -> Check:
    """A finite int or float in the given bounds (`above`/`below` exclusive, `at_least` inclusive;
    `maximum`, inclusive, with its own message: a limit of what uses the value, not of its meaning)."""
    def check(value, key):
        ok = type(value) in (int, float) and math.isfinite(value)
        ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
        if not (ok and (below is None or value < below)):
            raise FabricqError(f"{key} must be {what}, got {value!r}")
        if maximum is not None and value > maximum:
            raise FabricqError(f"{key} must be at most {maximum}{why}, got {value!r}")
        return value
    return check


def text(value, key):
    if type(value) is not str or not value:
        raise FabricqError(f"{key} must be a non-empty string (quote a value that looks like a number), got {value!r}")
    return value


def optional(check: Check) -> Check:
    """`check`, or null. Messages of `check` already say when null is allowed."""
    return lambda value, key: None if value is None else check(value, key)


def regex_list(value, key):
    if not isinstance(value, (list, tuple)):
        raise FabricqError(f"{key} must be a list of regular expressions ({key}=[REGEX,...]), got {value!r}")
    for pattern in value:
        if type(pattern) is not str:
            raise FabricqError(f"{key} must hold regular expressions (strings), got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise FabricqError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None
    return tuple(value)


def setting(default, check: Check):
    return field(default=default, metadata={"check": check})


def section(cls):
    return field(default_factory=cls, metadata={"section": cls})


POSITIVE = integer(1, "a positive integer")
# torch's generators take seeds below 2**64 (torch.manual_seed raised an overflow mid-run).
SEED = integer(0, "an integer ≥ 0", maximum=(1 << 64) - 1, why=" (random generators take 64-bit seeds)")


# The schema, one class per config group (conf/<group>/*.yaml).

@dataclass(frozen=True)
class ModelSettings:
    path: str | None = setting(None, optional(text))
    dtype: str = setting("auto", one_of("auto", *MODEL_DTYPES, what=f"auto or one of {list(MODEL_DTYPES)}"))


@dataclass(frozen=True)
class DataSettings:
    path: str | None = setting(None, optional(text))
    text_field: str = setting("text", text)
    num_samples: int = setting(128, POSITIVE)
    seq_len: int = setting(512, POSITIVE)
    batch_size: int = setting(8, POSITIVE)
    eval_fraction: float = setting(0.1, number("a number between 0 and 1 (exclusive)", above=0, below=1))
    seed: int = setting(0, SEED)
    bos: str | bool = setting("auto", one_of("auto", True, False, what="auto, true or false"))
    sampling: str = setting("stream", one_of("stream", "documents"))
    chat_template: bool = setting(False, boolean)


@dataclass(frozen=True)
class QuantSettings:
    method: str = setting("gptq", one_of(*METHODS))
    bits: int = setting(4, one_of(*SUPPORTED_BITS))
    group_size: int = setting(128, integer(1, "a positive integer or -1 (per-channel)", also=(-1,), maximum=MAX_GROUP_SIZE,
                                           why=" (wider than any layer; -1 gives one group per row)"))
    symmetric: bool = setting(True, boolean)
    actorder: str = setting("static", one_of(*ACTORDERS))
    damp: float = setting(0.01, number("a finite number between 0 and 1 (exclusive)", above=0, below=1))
    block_size: int = setting(128, POSITIVE)
    hessian_dtype: str = setting("float32", one_of(*HESSIAN_DTYPES))
    true_sequential: bool = setting(True, boolean)
    ignore: tuple[str, ...] = setting((), regex_list)


@dataclass(frozen=True)
class TrainerSettings:
    """Lightning Fabric's own arguments, passed to `Fabric(...)` as they are."""

    accelerator: str = setting("auto", one_of(*ACCELERATORS))
    devices: int = setting(1, POSITIVE)
    num_nodes: int = setting(1, POSITIVE)
    strategy: str = setting("auto", one_of(*STRATEGIES))

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass(frozen=True)
class DistributedSettings:
    # A timedelta for the collectives: a larger finite number overflowed it at launch.
    timeout_s: float = setting(600, number("a positive number of seconds", above=0, maximum=1_000_000_000,
                                           why=" seconds (about 31 years)"))
    cpu_oversubscribe: bool = setting(False, boolean)


@dataclass(frozen=True)
class CacheSettings:
    device_mib: float | None = setting(None, optional(number("a number of MiB ≥ 0 or null (unlimited)", at_least=0)))
    host_mib: float | None = setting(None, optional(number("a number of MiB ≥ 0 or null (unlimited)", at_least=0)))
    spill_dir: str | None = setting(None, optional(text))
    heap: str = setting("compact", one_of(*HEAP_POLICIES))


@dataclass(frozen=True)
class PipelineSettings:
    solve_threads: int = setting(1, POSITIVE)


@dataclass(frozen=True)
class EvalSettings:
    enabled: bool = setting(True, boolean)
    path: str | None = setting(None, optional(text))
    seq_len: int = setting(2048, POSITIVE)
    max_windows: int | None = setting(8, optional(integer(1, "a positive integer or null (the whole text)")))
    stride: int | None = setting(None, optional(integer(1, "a positive integer or null (non-overlapping windows)")))
    kl_windows: int = setting(8, integer(0, "an integer ≥ 0"))
    kl_top_k: int = setting(64, POSITIVE)
    cache: bool = setting(True, boolean)


@dataclass(frozen=True)
class ExportSettings:
    format: str = setting("compressed-tensors", one_of(*EXPORT_FORMATS))
    dtype: str = setting("auto", one_of("auto", "float16", "bfloat16", "float32"))
    engine: str = setting("none", one_of("none", "vllm", "tgi", "transformers"))
    tp: int = setting(1, POSITIVE)
    tp_aware: bool = setting(False, boolean)


def module_names(value, key):
    if not isinstance(value, (list, tuple)) or not value or any(type(v) is not str or not v for v in value):
        raise FabricqError(f"{key} must be null (every quantized Linear) or a list of module names, suffixes "
                           f"(q_proj) or re:patterns, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class RecoveryDataSettings:
    path: str | None = setting(None, optional(text))


@dataclass(frozen=True)
class RecoverySettings:
    """conf/recovery/*.yaml (`+recovery=lora|qlora|eora`); rules between fields: fabricq.recovery.settings."""

    method: str = setting("lora", one_of("lora", "qlora", "eora"))
    rank: int = setting(32, POSITIVE)
    alpha: float = setting(32, number("a positive number", above=0))
    dropout: float = setting(0.0, number("a number from 0 to 1 (exclusive)", at_least=0, below=1))
    target_modules: tuple[str, ...] | None = setting(None, optional(module_names))
    init: str = setting("eora", one_of("eora", "zeros"))
    steps: int = setting(16, integer(0, "a positive integer (0 only with recovery=eora)"))
    lr: float = setting(1e-4, number("a positive number", above=0))
    schedule: str = setting("cosine", one_of("cosine", "linear", "constant"))
    warmup: int = setting(4, integer(0, "an integer ≥ 0"))
    batch_size: int = setting(1, POSITIVE)
    grad_accum: int = setting(1, POSITIVE)
    seq_len: int = setting(512, integer(2, "an integer ≥ 2"))
    loss: str = setting("kl", one_of("kl", "lm", "kl+lm"))
    temperature: float = setting(1.0, number("a positive number", above=0))
    top_k: int = setting(32, POSITIVE)
    weight_decay: float = setting(0.0, number("a number ≥ 0", at_least=0))
    max_grad_norm: float | None = setting(1.0, optional(number("a positive number or null (no clipping)", above=0)))
    eora_samples: int = setting(16, POSITIVE)
    damp: float = setting(0.01, number("a finite number between 0 and 1 (exclusive)", above=0, below=1))
    data: RecoveryDataSettings = section(RecoveryDataSettings)
    checkpoint_every: int = setting(4, POSITIVE)
    log_every: int = setting(4, POSITIVE)
    logit_chunk: int = setting(64, POSITIVE)
    activation_checkpointing: bool = setting(True, boolean)
    merge: bool = setting(False, boolean)
    seed: int = setting(0, SEED)


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = section(ModelSettings)
    data: DataSettings = section(DataSettings)
    quant: QuantSettings = section(QuantSettings)
    trainer: TrainerSettings = section(TrainerSettings)
    distributed: DistributedSettings = section(DistributedSettings)
    cache: CacheSettings = section(CacheSettings)
    pipeline: PipelineSettings = section(PipelineSettings)
    eval: EvalSettings = section(EvalSettings)
    export: ExportSettings = section(ExportSettings)
    recovery: RecoverySettings | None = field(default=None, metadata={"section": RecoverySettings})  # +recovery=…
    output_dir: str | None = setting(None, optional(text))
    overwrite: bool = setting(False, boolean)
    resume: str | bool = setting("auto", one_of("auto", True, False, what="auto, true or false"))
    seed: int = setting(0, SEED)

    def as_dict(self) -> dict:
        """Plain nested dict (lists for tuples), e.g. for hashing or YAML."""
        return OmegaConf.to_container(OmegaConf.create(asdict(self)))


# Reading a composed config

def recipe_spelling(override: str) -> str:
    """`+recipe=NAME` → `recipe=NAME`. `recipe` is in the primary defaults list, so `recipe=NAME`
    works like every group (sweeps included); Hydra 1.3 refuses to append (`+`) a group that is in
    the defaults list ("Multiple values for recipe"), and no defaults list accepts both spellings.
    The `+` spelling is the one the README has shown, so the command line (and tests/in_process.py)
    pass every override through this before Hydra composes (sys.argv itself is left alone)."""
    return override[1:] if override.startswith("+recipe=") else override


def unknown_key_message(full_key: str) -> str:
    """One line for a key that is not in the schema: what became of it, or the valid keys."""
    if full_key in REMOVED:
        return REMOVED[full_key]
    cls, parts = Settings, full_key.split(".")
    for depth, name in enumerate(parts):
        spec = {f.name: f for f in fields(cls)}.get(name)
        group = ".".join(parts[:depth])
        if spec is None:
            names = ", ".join(f.name for f in fields(cls))
            return f"unknown setting {full_key}: the {f'{group} settings' if group else 'top-level keys'} are {names}"
        if "section" not in spec.metadata:
            return f"{full_key} is not a setting: {'.'.join(parts[:depth + 1])} is a value, not a group"
        cls = spec.metadata["section"]
    return f"{full_key} is a group of settings, not a value"


def _build(cls, node, prefix: str, unused: set[str]):
    if not isinstance(node, dict):
        raise FabricqError(f"{prefix[:-1]} must be a group of settings, got {node!r}")
    valid = {f.name: f for f in fields(cls)}
    for key in node:
        if key not in valid:
            raise FabricqError(unknown_key_message(f"{prefix}{key}"))
    values = {}
    for name, spec in valid.items():
        if name not in node:  # the schema's default
            continue
        if "section" in spec.metadata:
            values[name] = _build(spec.metadata["section"], node[name], f"{prefix}{name}.", unused)
            continue
        try:
            values[name] = spec.metadata["check"](node[name], f"{prefix}{name}")
        except FabricqError:
            if f"{prefix}{name}" not in unused:
                raise
    return cls(**values)


def _unused(node) -> set[str]:
    """Keys this config never reads: with eval.enabled=false, the evaluation fields (the held-out
    fraction is still read: calibration leaves it out either way). A bad value there becomes the
    default instead of failing the run."""
    evaluation = node.get("eval") if isinstance(node, dict) else None
    if not (isinstance(evaluation, dict) and evaluation.get("enabled") is False):
        return set()
    return {f"eval.{f.name}" for f in fields(EvalSettings) if f.name != "enabled"}


def _plain(cfg: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        where = getattr(err, "full_key", None) or "the config"
        raise FabricqError(f"{where}: {str(err).splitlines()[0]}") from None


def load_settings(cfg: DictConfig | dict, environ=os.environ) -> Settings:
    """Check the composed config and return it typed. Raises FabricqError (one line) for the first
    problem: a bad value, an unknown or removed key, a contradiction between fields, a missing
    input file, or a launch this machine and environment cannot do."""
    node = _plain(cfg) if isinstance(cfg, DictConfig) else cfg
    settings = tensor_parallel_friendly(_build(Settings, node, "", _unused(node)))
    from fabricq.launcher import check_launch

    check_combinations(settings)
    check_input_files(settings)
    check_launch(settings.trainer, settings.distributed, environ)
    return settings


def tensor_parallel_friendly(s: Settings) -> Settings:
    """`export.tp_aware=true` asks for a checkpoint whose groups are contiguous, so a tensor-parallel
    engine shards scales with the rows and never gathers activations by g_idx. On a `dynamic` run that
    is folded act-order (the dynamic order where it folds exactly into the weights, static elsewhere);
    none, static and folded already have contiguous groups."""
    if s.export.tp_aware and s.quant.actorder == "dynamic":
        return replace(s, quant=replace(s.quant, actorder="folded"))
    return s


def check_combinations(s: Settings) -> None:
    """Rules between fields."""
    if s.recovery is not None:
        from fabricq.recovery.settings import check_recovery

        check_recovery(s)
    budgets = [k for k, v in (("cache.device_mib", s.cache.device_mib), ("cache.host_mib", s.cache.host_mib))
               if v is not None]
    if s.quant.true_sequential and s.quant.method == "gptq" and budgets:
        raise FabricqError(
            f"quant.true_sequential=true holds every batch's activations inside a layer at once, so "
            f"{' and '.join(budgets)} cannot be honoured: set quant.true_sequential=false to use cache budgets"
        )
    if s.eval.enabled and s.eval.stride is not None and s.eval.stride >= s.eval.seq_len:
        raise FabricqError(f"eval.stride must be null or an integer from 1 to eval.seq_len - 1 "
                           f"({s.eval.seq_len - 1}), got {s.eval.stride}")
    batches = math.ceil(s.data.num_samples / s.data.batch_size)
    if s.trainer.world_size > batches:
        raise FabricqError(
            f"{s.trainer.world_size} ranks but only {batches} calibration batches (data.num_samples="
            f"{s.data.num_samples}, data.batch_size={s.data.batch_size}): every rank needs at least one batch"
        )


def check_input_files(s: Settings) -> None:
    from fabricq.textfiles import check_text_path

    check_text_path(s.data.path, "data.path")
    if s.eval.enabled:
        check_text_path(s.eval.path, "eval.path")
