"""Keep freed host memory in the process, so that a CPU train step does not fault its buffers in anew.

XLA:CPU takes each step's temporaries (here ~1.6 GB for the 62M-parameter benchmark model) from malloc and
frees them at the end of the step. glibc serves requests of more than a few MB with fresh mmap's and unmaps
them on free, so every step the kernel zero-fills the same pages again: on the project's 2-core VM that was
1-4 s of system time in a ~5 s step (`benchmarks/train_step.py --allocator`). `keep_freed_memory` tells glibc
to serve everything from its heap and never trim it; freed blocks are then reused as they are. The cost: the
process's resident memory stays at its peak instead of shrinking between steps.

Applied by `aki_jax.training.train` on the CPU backend; `AKI_KEEP_FREED_MEMORY=0` turns it off. Another
allocator preloaded (tcmalloc, jemalloc) keeps freed memory by itself; then this changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV = "AKI_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed memory (glibc only). True when applied.

    One arena (per-thread arenas are capped at 64 MB heaps, too small for a step's buffers), no mmap for
    large requests, no trimming of the heap's top. Returns False, changing nothing, when `AKI_KEEP_FREED_MEMORY`
    is "0" or the C library is not glibc.
    """
    if os.environ.get(ENV, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS have no such symbol)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))  # fmt: skip
