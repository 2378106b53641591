"""Old home of the atomic-write helpers, now in fastneg.fs (the one filesystem-safety module).

Only re-exports remain, for callers not yet switched (benchmarks/gpu_check.py); new code
imports fastneg.fs.
"""
from fastneg.fs import (atomic_file, check_writable, staged_dir, swap_in,  # noqa: F401
                        temporary_sibling, write_bytes_atomic)
