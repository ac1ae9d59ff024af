"""Which dtype calibration forwards run in, and whether Hessians use bf16 products: decided from
what this host measurably computes fast, not from the dtype's name.

bf16 halves the bytes of every activation, but only some CPUs multiply bf16 natively (AVX-512
BF16, AMX, Arm BF16); elsewhere torch emulates it, many times slower than float32. So:

- the CPU flags (/proc/cpuinfo) and torch's oneDNN say whether native bf16 kernels exist at all;
  without them bf16 is never chosen and nothing is measured;
- with them, a short micro-benchmark measures float32 and bf16 matrix-product rates at the run's
  thread count; the result is cached under the fabricq cache directory (`FABRICQ_CACHE`, default
  ~/.cache/fabricq), keyed by CPU model, flags, torch version and threads;
- `choose_forward_dtype` (pure) turns the source dtype, the rates and the quality conditions into
  the forward dtype; `bf16_products_pay` says whether Hessians of bf16 activations should use bf16
  products (`fabricq.quant.gram`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fabricq.quant.gram import accumulate_gram  # noqa: F401  (in quant/ so that quant/hessian.py may use it)

log = logging.getLogger(__name__)

# CPU flags (Linux's names) of instructions that multiply bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm (FEAT_BF16)
# bf16 must beat float32 by this factor before auto picks it: converting a float32 model halves
# its activations' precision, which only a clear gain justifies; it also absorbs measurement noise.
MIN_BF16_SPEEDUP = 1.5
# (tokens, in, out) of the measured product: the size class of a decoder Linear's calibration batch.
BENCH_SHAPE = (1024, 512, 512)
BENCH_SECONDS = 0.4
RATES_FORMAT = 1  # bump when the measurement changes: old cache entries are then ignored


# ---------------------------------------------------------------- what the host offers


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags: x86's `flags` line, or Arm's `Features` line."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "CPU part"):
            return value.strip()
    return platform.processor() or platform.machine()


def native_bf16_flags(flags: frozenset[str]) -> list[str]:
    """The flags that show native bf16 arithmetic (empty: none, e.g. an AVX2-only CPU)."""
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def torch_bf16_kernels() -> bool:
    """Whether this torch build has oneDNN bf16 kernels for this CPU (it also says yes to AVX-512
    CPUs that only emulate bf16, hence the flags as well)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the op
        return False


# ---------------------------------------------------------------- measured rates


def measure_matmul_rates(shape: tuple[int, int, int] = BENCH_SHAPE, seconds: float = BENCH_SECONDS,
                         rounds: int = 2) -> dict[str, float]:
    """FLOP/s of an (m×k)·(k×n) product in float32 and in bf16 at the current thread count: the
    best of `rounds` interleaved timings of each (a busy machine slows some rounds, not the
    hardware), each at least one product after a warm-up."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    operands = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
    budget = seconds / (rounds * len(operands))
    best = dict.fromkeys(operands, 0.0)
    for _ in range(rounds):
        for name, (left, right) in operands.items():
            torch.mm(left, right)
            reps, start = 0, time.perf_counter()
            while True:
                torch.mm(left, right)
                reps += 1
                elapsed = time.perf_counter() - start
                if elapsed >= budget:
                    break
            best[name] = max(best[name], reps * 2 * m * k * n / elapsed)
    return best


def cache_root() -> Path:
    return Path(os.environ.get("FABRICQ_CACHE") or Path.home() / ".cache" / "fabricq")


def rates_key(cpuinfo: str, threads: int) -> dict:
    """What a measurement depends on: a cached one is reused only when all of it matches."""
    return {"format": RATES_FORMAT, "cpu": cpu_model(cpuinfo), "flags": sorted(cpu_flags(cpuinfo)),
            "torch": torch.__version__, "threads": threads, "shape": list(BENCH_SHAPE)}


def cached_matmul_rates(cpuinfo: str, threads: int, directory: Path | None = None,
                        measure=measure_matmul_rates) -> tuple[dict[str, float], bool]:
    """(rates, whether they came from the cache): measured once per host, torch and thread count,
    then read from `directory`/precision/ (default: the fabricq cache). An unreadable or
    unwritable cache only costs a new measurement."""
    key = rates_key(cpuinfo, threads)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = (directory or cache_root()) / "precision"
    file = folder / f"matmul-rates-{digest}.json"
    try:
        stored = json.loads(file.read_text())
        if stored.get("key") == key and _valid_rates(stored.get("rates")):
            return stored["rates"], True
    except (OSError, ValueError, AttributeError):
        pass
    rates = measure()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Atomic: a concurrent reader (another rank, another run) sees the old file or the whole new one.
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".partial-", suffix=".json", delete=False) as handle:
            json.dump({"key": key, "rates": rates}, handle)
        os.replace(handle.name, file)
    except OSError as err:
        log.debug("could not cache the matrix-product rates in %s: %s", folder, err)
    return rates, False


def _valid_rates(rates) -> bool:
    return isinstance(rates, dict) and all(
        isinstance(rates.get(name), (int, float)) and rates[name] > 0 for name in ("float32", "bfloat16"))


# ---------------------------------------------------------------- the decisions (pure)


def bf16_speedup(rates: dict[str, float] | None) -> float | None:
    return rates["bfloat16"] / rates["float32"] if _valid_rates(rates) else None


def bf16_products_pay(rates: dict[str, float] | None, native: bool, min_speedup: float = MIN_BF16_SPEEDUP) -> bool:
    """Whether Hessians of bf16 activations should use bf16 products instead of converting the
    activations to float32: only where bf16 is native and measured faster by `min_speedup`."""
    speedup = bf16_speedup(rates)
    return native and speedup is not None and speedup >= min_speedup


def choose_forward_dtype(source_dtype: str | None, rates: dict[str, float] | None, quality_ok: bool, *,
                         requested: str = "auto", native: bool, min_speedup: float = MIN_BF16_SPEEDUP) -> tuple[str, str]:
    """(dtype of the calibration forwards, why). `requested` is model.dtype: anything but auto is
    obeyed. auto keeps a reduced-precision source as saved, and runs a float32 source in bf16 only
    where all hold: the host has native bf16 (`native`: CPU flags and torch kernels), bf16
    products were measured at least `min_speedup` times float32's (`rates`), and the run's
    quality conditions allow it (`quality_ok`). "auto" comes back when the saved dtype is unknown:
    the loader then uses what the files say."""
    if requested != "auto":
        return requested, "model.dtype"
    if source_dtype is None:
        return "auto", "saved dtype unknown: as saved"
    if source_dtype != "float32":
        return source_dtype, "as saved"
    if not native:
        return "float32", "as saved: this CPU has no native bf16"
    speedup = bf16_speedup(rates)
    if speedup is None:
        return "float32", "as saved: bf16 rate not measured"
    if speedup < min_speedup:
        return "float32", f"as saved: bf16 products measured {speedup:.2f}x float32's, below {min_speedup}x"
    if not quality_ok:
        return "float32", "as saved: the run asks for full precision"
    return "bfloat16", f"bf16 products measured {speedup:.2f}x float32's"


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run decided, for the loader, the Hessians and report.json's `precision` section."""

    forward_dtype: str  # what to load the model in ("auto": as saved)
    reason: str
    bf16_hessian_products: bool
    native_bf16: bool
    native_flags: tuple[str, ...]
    source_dtype: str | None
    rates: dict[str, float] | None  # FLOP/s of BENCH_SHAPE products; None: not measured
    rates_cached: bool | None
    threads: int

    def report(self) -> dict:
        out = asdict(self)
        out["native_flags"] = list(self.native_flags)
        out["bf16_speedup"] = bf16_speedup(self.rates)
        out["bench_shape"] = list(BENCH_SHAPE)
        return out


def decide_precision(requested: str, source_dtype: str | None, quality_ok: bool, *, cpuinfo: str | None = None,
                     directory: Path | None = None, measure=None, kernels=None) -> PrecisionChoice:
    """Detect, measure (cached; only where bf16 could be chosen or used) and decide. `cpuinfo`,
    `measure` and `kernels` default to this host's /proc/cpuinfo, `measure_matmul_rates` and
    `torch_bf16_kernels`."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = tuple(native_bf16_flags(cpu_flags(cpuinfo)))
    native = bool(flags) and (kernels or torch_bf16_kernels)()
    threads = torch.get_num_threads()
    may_run_bf16 = requested == "bfloat16" or (requested == "auto" and source_dtype in ("float32", "bfloat16"))
    rates, cached = None, None
    if native and may_run_bf16:
        rates, cached = cached_matmul_rates(cpuinfo, threads, directory, measure or measure_matmul_rates)
    dtype, reason = choose_forward_dtype(source_dtype, rates, quality_ok, requested=requested, native=native)
    products = dtype == "bfloat16" and bf16_products_pay(rates, native)
    return PrecisionChoice(dtype, reason, products, native, flags, source_dtype, rates, cached, threads)
