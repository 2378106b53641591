"""Every CUDA kernel of fastneg compiled for a real GPU target, without a GPU.

Numba's CUDA simulator runs the kernels' Python on the CPU and never type-checks them, so a
kernel can pass every simulator test and still fail to compile for a real card (it happened:
a shared-array shape written as an expression). compile_all() compiles each kernel with
numba-cuda's compile_ptx for a compute capability (NVVM from the `[cuda]` extra's wheels; no
driver, no device), with the argument types its launcher passes; kernel_resources() runs
ptxas -v on the PTX (when the CUDA toolkit's ptxas is on PATH) for registers and memory.

    python -m fastneg.cuda_targets --cc 9.0 8.0      # the table in docs/gpu.md

Each launch passes: Python ints (int64), floats (float64), bools, and device arrays whose
layout is 'C' when the tensor is contiguous, 'A' otherwise. The signatures below use 'A' for
arrays a caller may hand over strided (the images) and 'C' for the buffers fastneg allocates.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Compute capabilities the tests compile for: Hopper (H100/H200) and Ampere (A100).
TARGETS = ((9, 0), (8, 0))


def _signatures():
    """{kernel name: (python source with bound globals, argument types)}; imports numba.cuda."""
    from numba import types as t

    from fastneg.augment import cuda as augment_cuda
    from fastneg.kernels import patch, textures

    def arr(dtype, ndim, layout="C"):
        return t.Array(dtype, ndim, layout)

    i64, f64 = t.int64, t.float64
    draw, gather = patch.cuda_kernel_sources()
    params, resample = textures.cuda_kernel_sources()
    sigs = {
        "patch.draw": (draw, (i64, i64, i64, i64, i64, i64, t.boolean, arr(t.int32, 3),
                              arr(t.int32, 1))),
        "texture.params": (params, (i64, i64, i64, i64, f64, f64, f64, f64, arr(t.int32, 2))),
        "texture.resample": (resample, (arr(t.uint8, 4, "A"), arr(t.int64, 1),
                                        arr(t.uint8, 4), arr(t.int32, 2), i64, i64)),
        "augment.fused": (augment_cuda.cuda_kernel_source(),
                          (arr(t.uint8, 4, "A"), arr(t.uint8, 2), arr(t.float32, 2),
                           arr(t.int64, 2), arr(t.float32, 2), arr(t.float32, 2),
                           arr(t.float32, 1), arr(t.float32, 1), arr(t.float32, 1),
                           arr(t.float32, 4), arr(t.float32, 4))),
    }
    # the gather kernel moves words of 8, 4, 2 or 1 bytes (patch._widest_unit): one each
    for word in (t.int64, t.int32, t.int16, t.uint8):
        sigs[f"patch.gather[{word}]"] = (gather, (arr(word, 4, "A"), arr(word, 4),
                                                  arr(t.int32, 3), arr(t.int32, 1), i64, i64))
    return sigs


@contextlib.contextmanager
def _device_functions_target(cc):
    """Device functions (cuda.jit(device=True) dispatchers) compile for the *current device's*
    compute capability when a kernel that calls them is typed, even under compile_ptx(cc=...):
    with no GPU that asks the driver and fails. Within this block they see a device of `cc`.
    (numba-cuda 0.30: numba.cuda.dispatcher.get_current_device.)"""
    from unittest import mock

    from numba.cuda import dispatcher

    class _Target:
        compute_capability = cc

    with mock.patch.object(dispatcher, "get_current_device", lambda: _Target):
        yield


def compile_all(cc=(9, 0)) -> dict[str, str]:
    """{kernel name: PTX} for compute capability `cc`; raises RuntimeError naming the kernel
    that does not compile (typing, lowering or NVVM), with numba's error after it."""
    from numba import config, cuda
    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_all needs numba-cuda's compiler, not the CUDA simulator "
                           "(unset NUMBA_ENABLE_CUDASIM)")
    out = {}
    with _device_functions_target(cc):
        for name, (source, sig) in _signatures().items():
            try:
                out[name], _ = cuda.compile_ptx(source, sig, cc=cc)
            except Exception as e:       # noqa: BLE001 - re-raised with the kernel named
                raise RuntimeError(f"CUDA kernel {name} does not compile for "
                                   f"sm_{cc[0]}{cc[1]}: {type(e).__name__}: {e}") from e
    return out


def shared_bytes_declared(ptx: str) -> int:
    """Bytes of static shared memory the PTX declares (.shared arrays)."""
    return sum(int(m.group(1)) * int(m.group(2)) // 8 for m in re.finditer(
        r"\.shared\s+\.align\s+\d+\s+\.b(\d+)\s+\S+\[(\d+)\]", ptx))


def kernel_resources(ptx: str, cc=(9, 0)) -> dict | None:
    """{'registers', 'shared_bytes', 'spill_bytes'} from `ptxas -v` for the PTX, or None when no
    ptxas is on PATH (the CUDA toolkit; the pip wheels carry NVVM but not ptxas)."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip().splitlines()[-1:]}")
    text = done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    smem = re.search(r"(\d+) bytes smem", text)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "shared_bytes": int(smem.group(1)) if smem else 0,
            "spill_bytes": max((int(s) for s in spill), default=0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every fastneg CUDA kernel for real GPU "
                                            "targets on this machine (no GPU needed) and print "
                                            "registers and shared memory per kernel.")
    p.add_argument("--cc", nargs="+", default=[f"{a}.{b}" for a, b in TARGETS],
                   help="compute capabilities, e.g. 9.0 8.0 (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        ccs = [tuple(int(v) for v in cc.split(".")) for cc in args.cc]
        if any(len(cc) != 2 for cc in ccs):
            raise ValueError
    except ValueError:
        print(f"cuda_targets: error: --cc takes MAJOR.MINOR values, got {args.cc}",
              file=sys.stderr)
        return 2
    print("| kernel | target | registers | shared memory (bytes) | spills (bytes) |")
    print("|---|---|---|---|---|")
    for cc in ccs:
        for name, ptx in compile_all(cc).items():
            res = kernel_resources(ptx, cc)
            if res is None:
                regs, smem, spill = "no ptxas", shared_bytes_declared(ptx), "-"
            else:
                regs, smem, spill = res["registers"], res["shared_bytes"], res["spill_bytes"]
            print(f"| {name} | sm_{cc[0]}{cc[1]} | {regs} | {smem} | {spill} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
