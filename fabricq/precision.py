"""Which dtype calibration forwards run in, and whether Hessians use bf16 products: decided from
the checkpoint's saved dtype, the request and this CPU's flags, never from a timing.

A timing taken while another process is busy measures the load, not the hardware: a bf16/float32
ratio measured that way once flipped a run to float32 on a host where bf16 is 7x faster. So the
decision is a pure function of what does not change between two runs of one command on one host:

- `model.dtype=auto` keeps the checkpoint's saved dtype. A float32 model stays float32 even where
  bf16 is native and faster: bf16 forwards halve the activations' precision, which cost the
  default model measurable perplexity (benchmarks/README.md, "float32 vs bf16 forwards").
  `model.dtype=bfloat16` is the explicit way to trade that quality for speed.
- Hessians of bf16 activations use bf16 products (`fabricq.quant.gram`) where the CPU multiplies
  bf16 natively (flags in /proc/cpuinfo, and torch's oneDNN kernels for them); elsewhere bf16 is
  emulated, many times slower than float32, and activations are converted instead.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fabricq.quant.gram import accumulate_gram  # noqa: F401  (in quant/ so that quant/hessian.py may use it)

log = logging.getLogger(__name__)

# CPU flags (Linux's names) of instructions that multiply bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm (FEAT_BF16)


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


# ---------------------------------------------------------------- the decisions (pure)


def choose_forward_dtype(source_dtype: str | None, *, requested: str = "auto") -> tuple[str, str]:
    """(dtype of the calibration forwards, why). `requested` is model.dtype: anything but auto is
    obeyed; auto keeps the saved dtype ("auto" comes back when it is unknown: the loader then
    uses what the files say)."""
    if requested != "auto":
        return requested, "model.dtype"
    if source_dtype is None:
        return "auto", "saved dtype unknown: as saved"
    if source_dtype == "float32":
        return "float32", "as saved: keeps a float32 model's quality (model.dtype=bfloat16 trades it for speed)"
    return source_dtype, "as saved"


def bf16_products_used(forward_dtype: str, hessian_dtype: str, native: bool) -> bool:
    """Whether Hessians of this run's activations use bf16 products: bf16 forwards, float32 sums
    (float64 Hessians are asked for exactness and always convert), and native bf16."""
    return forward_dtype == "bfloat16" and hessian_dtype == "float32" and native


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run decided, for the loader, the Hessians, the resume identity and report.json's
    `precision` section."""

    forward_dtype: str  # what to load the model in ("auto": as saved)
    reason: str
    bf16_hessian_products: bool
    native_bf16: bool
    native_flags: tuple[str, ...]
    source_dtype: str | None

    def report(self) -> dict:
        out = asdict(self)
        out["native_flags"] = list(self.native_flags)
        return out

    def identity(self) -> dict:
        """What of the choice changes the result (for the resume identity)."""
        return {"forward_dtype": self.forward_dtype, "bf16_hessian_products": self.bf16_hessian_products}


def decide_precision(requested: str, source_dtype: str | None, hessian_dtype: str = "float32", *,
                     cpuinfo: str | None = None, kernels=None) -> PrecisionChoice:
    """Detect and decide. `cpuinfo` and `kernels` default to this host's /proc/cpuinfo and
    `torch_bf16_kernels`; nothing is timed, so the same command on the same host decides the same."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = tuple(native_bf16_flags(cpu_flags(cpuinfo)))
    native = bool(flags) and (kernels or torch_bf16_kernels)()
    dtype, reason = choose_forward_dtype(source_dtype, requested=requested)
    # "auto" with an unknown saved dtype: the loader decides; products follow what it loads only
    # when that is known here, so an unknown dtype converts (the safe side).
    products = bf16_products_used(dtype, hessian_dtype, native)
    return PrecisionChoice(dtype, reason, products, native, flags, source_dtype)
