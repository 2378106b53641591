"""Every CUDA kernel compiles for real GPUs (sm_90: H100/H200, sm_80: A100) on this CPU.

Numba's CUDA simulator never type-checks a kernel, so the simulator tests alone let a kernel
through that a real GPU rejects (the fused aug-plus kernel's shared-array shape did exactly
that). These tests run numba-cuda's real compiler with the NVVM of the `[cuda]` extra; no
driver and no GPU are involved.
"""
import shutil

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda (the [cuda] extra) is not installed")

from fastneg import cuda_targets  # noqa: E402
from fastneg.augment import cuda as augment_cuda  # noqa: E402

# registers per SM (and the most one block may use) on sm_80 and sm_90
REGISTERS_PER_BLOCK = 65536

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=cuda_targets.TARGETS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
def target(request):
    return request.param, cuda_targets.compile_all(request.param)


def test_every_kernel_compiles_to_ptx_for_the_target(target):
    cc, ptx = target
    # four kernels, the gather one for each word size the launcher may pick
    assert {"patch.draw", "texture.params", "texture.resample", "augment.fused"} <= set(ptx)
    assert sum(name.startswith("patch.gather[") for name in ptx) == 4
    for name, code in ptx.items():
        assert f".target sm_{cc[0]}{cc[1]}" in code, name
        assert ".entry" in code, name


def test_the_fused_kernel_declares_its_shared_row_buffer(target):
    _, ptx = target
    declared = cuda_targets.shared_bytes_declared(ptx["augment.fused"])
    # the float64 block-reduction buffer plus three float32 planes of one row
    assert declared == augment_cuda.THREADS * 8 + augment_cuda.ROW_FLOATS * 4


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas (CUDA toolkit) on PATH")
def test_the_launch_shapes_fit_the_registers_of_one_block(target):
    cc, ptx = target
    threads = {"augment.fused": augment_cuda.THREADS, "texture.resample": 128,
               "patch.draw": 64, "texture.params": 64}
    for name, code in ptx.items():
        res = cuda_targets.kernel_resources(code, cc)
        per_block = threads.get(name, 32 * 4)          # gather: (32 lanes, 4 warps)
        # more than this and the launch fails: "too many resources requested for launch"
        assert res["registers"] * per_block <= REGISTERS_PER_BLOCK, (name, res)
        assert res["spill_bytes"] == 0, (name, res)


def _shape_as_an_expression(x):
    """The bug the simulator hid: an expression as a shared array's shape."""
    row = cuda.shared.array(3 * MAX_WIDTH, np.float32)  # noqa: F821
    row[0] = 1
    x[0] = row[0]


def test_a_kernel_that_does_not_type_is_reported_by_name(monkeypatch):
    import numpy as np
    from numba import cuda, types

    from fastneg.kernels import rng
    source = rng._rebind(_shape_as_an_expression, {"cuda": cuda, "np": np, "MAX_WIDTH": augment_cuda.MAX_WIDTH})
    monkeypatch.setattr(cuda_targets, "_signatures",
                        lambda: {"bad": (source, (types.float32[::1],))})
    with pytest.raises(RuntimeError, match=r"CUDA kernel bad does not compile for sm_90: "
                                           r"TypingError"):
        cuda_targets.compile_all((9, 0))


def test_numpy_without_row_stack_still_compiles_kernels(monkeypatch):
    # numpy 2.5 removed np.row_stack, which numba-cuda 0.30.4 registers an overload of when it
    # compiles; fastneg gives the alias back before it compiles anything for CUDA
    import numpy as np

    from fastneg.kernels import rng
    monkeypatch.delattr(np, "row_stack", raising=False)
    rng.cuda_device_jit()
    assert np.row_stack is np.vstack
    ptx = cuda_targets.compile_all((9, 0))
    assert ".entry" in ptx["patch.draw"]
