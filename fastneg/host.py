"""Process-wide memory setting for CPU work. Importing this module changes nothing; the first
aug-plus on a CPU batch calls keep_freed_memory_once() (FASTNEG_KEEP_FREED_MEMORY=0 turns that
off), and the trainer (fastneg.train, on the CPU) and the benchmarks call keep_freed_memory() at
start.

Every CPU step allocates its large arrays anew: aug-plus's float32 output is 38.5 MB per view
at batch 64 x 224 px. glibc serves blocks that large with a fresh mmap and returns them to the
kernel when freed, so each step first-touches ~19,000 new pages. numpy asks for transparent huge
pages on such arrays, and on a machine whose free memory is fragmented the kernel compacts memory
to find them, synchronously, inside those page faults. Measured (2-core AMD EPYC VM,
MoCoV2Augment.apply on 64 x 224^2 uint8, 30 calls in a row): 13-14 ms per call when huge pages
were at hand, 55-63 ms in stretches of 6-13 calls when they were not (several per run, at the
start and later), 22-25 ms with plain 4 KB pages; with freed memory kept in the process,
12-14 ms from the third call on, in every run.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD = -1   # glibc malloc.h: free memory kept at the top of the heap before trimming
_M_MMAP_THRESHOLD = -3   # blocks at least this large get an mmap of their own
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Make glibc's malloc serve blocks smaller than `limit` bytes from the heap and keep up to
    `limit` bytes of freed memory there, so that a step's arrays reuse the pages of the step
    before instead of faulting in new ones (module docstring). Costs up to `limit` bytes of
    memory held after a peak. Returns False, changing nothing, where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version      # glibc only (musl has no mallopt thresholds to set)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = int(min(limit, 2 ** 31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


@functools.cache
def keep_freed_memory_once() -> bool:
    """keep_freed_memory(), once per process, unless FASTNEG_KEEP_FREED_MEMORY=0: what the
    library does on its first large CPU allocation, so a user's own loop gets the same speed as
    the trainer (the plain loop of benchmarks/plain_process.py)."""
    if os.environ.get("FASTNEG_KEEP_FREED_MEMORY", "1") == "0":
        return False
    return keep_freed_memory()
