"""`cached_njit`: numba.njit with an on-disk cache that notices changes in the code it inlines.

Numba's own cache (njit(cache=True)) keys a compiled function on the source of the file that
defines it. fastneg's kernels inline helpers from other files (the RNG of
fastneg.kernels.rng, crop boxes, the op ids of fastneg.augment), so after an edit there Numba
would load a stale kernel. `cached_njit` keys the cache on the defining file *and* every file the
kernel can inline from: all of fastneg/kernels/ (the bottom of the import chain: kernels import
nothing else from fastneg) plus the modules named in `depends`.

A second process then loads every kernel from disk instead of compiling it (seconds saved per
kernel). The cache lives where Numba puts it (__pycache__ beside the source, or NUMBA_CACHE_DIR).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
from pathlib import Path

import numba
from numba.core.caching import FunctionCache

KERNELS_DIR = Path(__file__).resolve().parent

# Numba's threading layer for the parallel kernels: OpenMP first, then TBB. Under the tbb layer
# with oneTBB 2021.8 (Debian 12's libtbb12, which the FFCV build packages pull in) every launch of
# a parallel kernel cost more than the one before: patch_negatives on a tiny batch took 47 us per
# call over its first 5,000 calls and 761 us over calls 35,000-40,000, against 13 us throughout
# under omp (2-core AMD EPYC, benchmarks/launch_overhead.py). The omp layer does not grow. Its
# GNU OpenMP pool is not torch's (torch loads its own libgomp), so both pools should sleep, not
# spin, while they wait: OMP_WAIT_POLICY=PASSIVE, which importing fastneg sets by default.
# Caveat (Numba's docs): under GNU OpenMP a process forked after a parallel kernel ran must not
# launch one itself (Numba stops it); fastneg's forked workers (DataLoader, texture synthesis,
# corruptions) launch none. A NUMBA_THREADING_LAYER(_PRIORITY) set by the user wins.
PREFERRED_THREADING_LAYERS = ["omp", "tbb", "workqueue"]
if numba.config.THREADING_LAYER == "default" and \
        "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = PREFERRED_THREADING_LAYERS


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> bytes:
    """sha256 of a file's bytes (memoized on its stat, so an edit while running re-hashes)."""
    return hashlib.sha256(Path(path).read_bytes()).digest()


def source_key(files) -> str:
    """One hex digest of the contents of `files` (paths; order does not matter)."""
    h = hashlib.sha256()
    for path in sorted({str(Path(f).resolve()) for f in files}):
        st = os.stat(path)
        h.update(path.encode() + b"\0" + _file_digest(path, st.st_mtime_ns, st.st_size))
    return h.hexdigest()


class _KeyedCache(FunctionCache):
    """Numba's FunctionCache whose freshness stamp also covers `files`: when any of them
    changes, the stored index no longer matches and the function is compiled (and saved) anew."""

    def __init__(self, py_func, files):
        super().__init__(py_func)
        # the index file keeps one stamp and drops its entries when the stamp differs
        self._cache_file._source_stamp = (self._cache_file._source_stamp, source_key(files))


def cached_njit(*, depends=(), **options):
    """Decorator: numba.njit(**options) with an on-disk cache keyed on the source of the
    function's file, of fastneg/kernels/*.py and of the modules in `depends` (module objects
    whose compile-time constants or inlined functions the kernel uses)."""
    def decorate(fn):
        dispatcher = numba.njit(cache=False, **options)(fn)
        files = [inspect.getfile(fn), *KERNELS_DIR.glob("*.py"),
                 *(inspect.getfile(m) for m in depends)]
        try:
            dispatcher._cache = _KeyedCache(fn, files)
        except RuntimeError:   # no writable cache location: compile in every process, as before
            pass
        return dispatcher
    return decorate
