"""How the process's C heap hands memory back to the operating system (glibc only).

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

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3

# Blocks of at least this many bytes get their own mapping. Below it: Python objects, small
# tensors (biases, norms, scales), where a system call per allocation would cost more than the
# memory it saves.
DEFAULT_THRESHOLD = 1 << 20


def _glibc():
    """The C library if it is glibc (has `mallopt`), else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def return_large_blocks_to_os(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every heap block of `threshold` bytes or more from its own mapping, so that freeing
    it returns its pages to the OS at once, and trim the heap's free top past `threshold` too.
    Returns whether the policy is in effect (False off glibc, where nothing is changed)."""
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(threshold)) == 1 and applied
    if not applied:
        log.debug("mallopt refused the heap thresholds; the C library's defaults stay in effect")
    return applied
