"""The C heap and the operating system: returning freed memory (glibc only; no-ops elsewhere);
and an import that leaves a library fabricq never calls out of memory (`import_without`).

How the process's C heap hands memory back to the operating system (glibc only).

Tensors on the host are plain `malloc` blocks. glibc serves a large block with its own `mmap`
(returned to the OS on `free`) only up to a threshold that it *raises* every time such a block is
freed, up to 32 MiB. After a few layers, every activation, Hessian and packing temporary of a few
MiB therefore lands in the ordinary heap, interleaved with small blocks that stay alive (results,
Python objects); freeing the big ones leaves holes the heap cannot give back. The process's
resident memory then climbs well above what is alive: packing the 210 modules of SmolLM2-135M for
export grew it by ~410 MiB for 51 MiB of packed weights, and each calibrated layer by ~250 MiB
until the next `malloc_trim`.

`return_large_blocks_to_os` pins the threshold (which also stops glibc from moving it): every
block from `threshold` bytes up is mapped on its own and unmapped when freed, so resident memory
follows the memory that is alive. The price is a page fault per fresh page of each large block.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import logging
import os
import resource
import sys
from pathlib import Path


def release_freed_memory(collect_cycles: bool = False) -> None:
    """Return freed heap pages to the OS: glibc keeps them otherwise, and they count in the run's
    peak RSS (the tokenizer's transient buffers of whole-corpus encodings, ~130 MB for the C4
    sample; each calibrated layer's activations and Hessians). No-op off glibc.

    `collect_cycles` also runs the cyclic garbage collector first. It costs ~0.3 s once a model
    and its libraries are loaded, and per calibrated layer it bought no measurable RSS (tensors
    are freed by reference counting; measured on the default model, 30 layers: peak RSS
    1527/1545 MiB with it, 1367/1667 MiB without, i.e. noise), so layers only trim."""
    if collect_cycles:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def share_one_malloc_arena() -> None:
    """Make threads allocate from glibc's main heap instead of an arena each. The gated forward
    runs every batch on a thread of its own (one at a time): with per-thread arenas, memory one
    batch frees cannot serve another and is not trimmed — measured +250 MiB peak RSS on the
    default model at 32×512 tokens. No-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, ctypes.c_int(1))


log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# Blocks of at least this many bytes get their own mapping. Below it: Python objects, small
# tensors (biases, norms, scales), where a system call per allocation would cost more than the
# memory it saves. 2 MiB is where torch starts backing blocks with huge pages
# (`huge_pages_for_large_tensors`): a smaller mapped block would fault in 4 KiB pages each time it
# is allocated again (benchmarks/results/2026-11-28-heap-policy.md).
DEFAULT_THRESHOLD = 2 << 20
_returning_threshold: int | None = None  # what return_large_blocks_to_os set, if it did


def _glibc():
    """The C library if it is glibc (has `mallopt`), else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "gnu_get_libc_version") else None  # only glibc has it
    except (OSError, AttributeError, TypeError):
        return None


def return_large_blocks_to_os(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every heap block of `threshold` bytes or more from its own mapping, so that freeing
    it returns its pages to the OS at once, and trim the heap's free top past `threshold` too.
    Returns whether the policy is in effect (False off glibc, where nothing is changed)."""
    libc = _glibc()
    if libc is None:
        return False
    global _returning_threshold
    applied = _set_thresholds(libc, threshold, threshold)
    if not applied:
        log.debug("mallopt refused the heap thresholds; the C library's defaults stay in effect")
    _returning_threshold = threshold if applied else None
    return applied


def _set_thresholds(libc, mmap_threshold: int, trim_threshold: int) -> bool:
    applied = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1 and applied


# glibc's largest mmap threshold (32 MiB on 64-bit): blocks below it can be served from the heap.
REUSE_MMAP_THRESHOLD = 32 << 20
REUSE_TRIM_THRESHOLD = 1 << 30


@contextlib.contextmanager
def reusing_freed_blocks():
    """Inside: freed blocks of up to 32 MiB stay in the heap and serve the next allocation of
    their size, as glibc's own policy does; on leaving, `return_large_blocks_to_os`'s policy is
    back and the heap is trimmed. For loops whose memory alive is the same from one iteration to
    the next (an evaluation: the model and one window's activations): mapping each temporary
    afresh there buys no peak memory and costs a page fault per page of every activation,
    while the heap can hold at most one iteration's temporaries (benchmarks/results/2026-11-28-default-run.md,
    "evaluation heap reuse"). A no-op unless `return_large_blocks_to_os` is in effect."""
    with _thresholds_while_inside(REUSE_MMAP_THRESHOLD, REUSE_TRIM_THRESHOLD):
        yield


# Activation-sized blocks of a training step (a 512-token window's hidden states, its key/value
# projections) lie between this and `DEFAULT_THRESHOLD`.
STEP_MMAP_THRESHOLD = 128 << 10


@contextlib.contextmanager
def mapping_small_blocks(threshold: int = STEP_MMAP_THRESHOLD):
    """Inside: blocks from `threshold` bytes up that the heap's free chunks cannot hold get their
    own mapping instead of growing the heap (on leaving, `return_large_blocks_to_os`'s policy is
    back and the heap is trimmed). For a loop of many sub-2-MiB temporaries (a training step's
    activations): under the 2 MiB threshold they grow the heap, whose freed middle stays resident
    until trimmed and is faulted in again wherever later blocks land, so resident memory climbs far
    above what is alive (benchmarks/results/2026-11-28-recovery-training-memory.md).
    A no-op unless `return_large_blocks_to_os` is in effect."""
    with _thresholds_while_inside(threshold, _returning_threshold):
        yield


@contextlib.contextmanager
def _thresholds_while_inside(mmap_threshold: int, trim_threshold: int):
    """These heap thresholds inside, `return_large_blocks_to_os`'s on leaving (heap trimmed); a
    no-op unless that policy is in effect."""
    libc = _glibc() if _returning_threshold is not None else None
    if libc is None or not _set_thresholds(libc, mmap_threshold, trim_threshold):
        yield
        return
    try:
        yield
    finally:
        _set_thresholds(libc, _returning_threshold, _returning_threshold)
        release_freed_memory()


TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def huge_pages_for_large_tensors() -> bool:
    """Ask torch to back every CPU tensor of 2 MiB or more with transparent huge pages (torch's
    `THP_MEM_ALLOC_ENABLE`: 2 MiB-aligned blocks, `madvise(MADV_HUGEPAGE)`). With freed large
    blocks returned to the OS (`return_large_blocks_to_os`), each fresh activation is new memory,
    and faulting it in 4 KiB pages is slow; a huge page is one fault for 512 of them (the
    blocks are still unmapped when freed: same peak; benchmarks/results/2026-11-23-heap-policy.md).

    torch reads the variable once, at its first allocation, so this must run before torch is
    imported (`python -m fabricq` does; a library user sets the variable in the environment).
    An explicit value in the environment wins. Returns whether the setting is in effect."""
    if "torch" not in sys.modules:
        os.environ.setdefault(TORCH_HUGE_PAGES, "1")
    return os.environ.get(TORCH_HUGE_PAGES) == "1"


MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _private_file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of this process's private mappings of files whose name ends with `suffix`."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p") and fields[5].endswith(suffix):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


PAGEMAP_PRESENT = 1 << 63  # /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PAGEMAP_FILE_OR_SHARED = 1 << 61


def _written_pages(start: int, end: int) -> list[bool] | None:
    """Per page of [start, end) (page-aligned, inside a private file mapping): whether this
    process holds its own copy of it (present and anonymous: written since it was mapped). None
    where /proc/self/pagemap cannot be read."""
    import numpy as np

    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // _PAGE * 8)
            entries = np.frombuffer(f.read((end - start) // _PAGE * 8), dtype="<u8")
    except OSError:
        return None
    if len(entries) != (end - start) // _PAGE:
        return None
    present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
    anonymous = (entries & np.uint64(PAGEMAP_FILE_OR_SHARED)) == 0
    return (present & anonymous).tolist()


def _unwritten_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The runs of pages of [start, end) that still read as the file (none where that is unknown)."""
    written = _written_pages(start, end)
    if written is None:
        return []
    runs, run_start = [], None
    for i, dirty in enumerate([*written, True]):
        if not dirty and run_start is None:
            run_start = i
        elif dirty and run_start is not None:
            runs.append((start + run_start * _PAGE, start + i * _PAGE))
            run_start = None
    return runs


def drop_mapped_pages(tensors, suffix: str = ".safetensors", keep_written: bool = False) -> int:
    """Take the pages of `tensors` that lie in private mappings of `suffix` files (weights the
    loader memory-mapped from a checkpoint) out of this process's resident memory: clean pages
    are simply unmapped (re-read from the page cache if touched again), pages written since
    (copy-on-write copies) are discarded, so the memory reads as the file again. Only whole
    pages inside a tensor and inside such a mapping are advised; other memory (the heap) is
    never touched. Callers use it for weights they will not read again, or that are unchanged.
    `keep_written`: leave pages written since (and so any change to the tensors) untouched, for
    tensors whose callers cannot know whether anything changed them.
    Returns the bytes advised (0 off Linux/glibc)."""
    libc = _glibc()
    if libc is None:
        return 0
    mappings = _private_file_mappings(suffix)
    if not mappings:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        start = -(-start // _PAGE) * _PAGE  # whole pages only: neighbours may share the edges
        end = end // _PAGE * _PAGE
        for low, high in mappings:
            lo, hi = max(start, low), min(end, high)
            if lo >= hi:
                continue
            for a, b in _unwritten_runs(lo, hi) if keep_written else [(lo, hi)]:
                if libc.madvise(a, b - a, MADV_DONTNEED) == 0:
                    advised += b - a
    return advised


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def import_without(module: str, optional: tuple[str, ...]):
    """Import `module` while the packages `optional` (ones it can do without) look absent to
    it, then make them importable again; returns the module. Python's documented way:
    `sys.modules[name] = None` makes `import name` raise ImportError (and `find_spec` answer
    None). Packages already imported are left alone; if `module` fails without them after all,
    it is imported with them. `python -m fabricq` uses it for what the libraries import and
    fabricq never calls: torchmetrics and matplotlib, imported by Lightning Fabric's version
    checks (their only reader is Fabric's SpikeDetection), ~58 MiB resident; scipy, imported by
    transformers' object-detection losses, ~36 MiB."""
    left_out = [name for name in optional if name not in sys.modules]

    def restore():
        for name in left_out:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]

    for name in left_out:
        sys.modules[name] = None
    try:
        return importlib.import_module(module)
    except ImportError:
        restore()
        return importlib.import_module(module)
    finally:
        restore()


# ---------------------------------------------------------------- peak memory


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark since the last `reset_peak_rss` (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new high-water mark (Linux: `5` into clear_refs), so each phase's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the lifetime peak is reported
        pass
