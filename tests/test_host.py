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


def test_the_first_cpu_augment_keeps_freed_memory_unless_turned_off():
    code = """
import ctypes, sys, torch
from fastneg.augment import MoCoV2Augment
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
aug = MoCoV2Augment()
x = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
aug.apply(x, aug.sample(2, seed=0, step=0))
import numpy as np
a = np.ones(64 << 20, np.uint8)
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc.mallinfo2.restype = Mallinfo2
print(libc.mallinfo2().hblkhd < 64 << 20)   # from the heap, not an mmap of its own
"""
    try:
        import ctypes
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("not glibc >= 2.33 (no mallinfo2 to check with)")
    import os
    for setting, heap in (("1", "True"), ("0", "False")):
        env = {**os.environ, "FASTNEG_KEEP_FREED_MEMORY": setting}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [heap], setting


def test_importing_fastneg_sets_a_passive_openmp_wait_policy_unless_set():
    code = "import os, fastneg; print(os.environ['OMP_WAIT_POLICY'])"
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, env=run_env)
        assert done.stdout.strip() == want, done.stderr
