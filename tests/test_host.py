"""fastneg.host.keep_freed_memory: large blocks come from the heap, which keeps them when freed."""
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import numpy as np
from fastneg.host import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory() is True
a = np.ones(64 << 20, np.uint8)                      # 64 MB
mmapped = libc.mallinfo2().hblkhd >= 64 << 20        # its own mmap?
del a
kept = libc.mallinfo2().fordblks >= 64 << 20         # freed bytes still held by the heap?
print(mmapped, kept)
"""


def _run(mode):
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_large_blocks_come_from_the_heap_and_stay_there_when_freed():
    try:
        import ctypes
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("not glibc >= 2.33 (no mallinfo2 to check with)")
    assert _run("plain") == ["True", "False"]    # glibc's default: an mmap, returned on free
    assert _run("keep") == ["False", "True"]
