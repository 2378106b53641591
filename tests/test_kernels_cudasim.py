"""The CUDA kernels of fastneg.kernels under Numba's CUDA simulator, bit for bit against the CPU.

Run in its own process with NUMBA_ENABLE_CUDASIM=1 (make test does). The kernels are launched
exactly as on a GPU, through the same launch functions, on simulator arrays; tiny grids make
the grid-stride loops cover more than one row or column per thread.
"""
import numpy as np
import pytest
import torch

from fastneg.kernels import patch, patch_negatives, sample_textures, textures

pytestmark = [pytest.mark.cudasim,
              # the simulator runs the RNG on NumPy scalars, which warn on the intended wrap-around
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

H, W = 37, 50
PATCH_RANGE = (3, 12)


def _images(dtype, layout, channels_last, seed=0, shape=(2, H, W, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 255, shape, generator=g, dtype=torch.uint8).to(dtype)
    planar = x.permute(0, 3, 1, 2).contiguous()
    if layout == "nchw":
        return planar.contiguous(memory_format=torch.channels_last) if channels_last else planar
    return planar.permute(0, 2, 3, 1) if channels_last else x


def _simulated_patch(x, layout, mode, seed, step, blocks, threads, patch_range=PATCH_RANGE):
    """patch_negatives of x through the CUDA kernels on simulator arrays, as _patch_cuda does."""
    from numba import cuda
    geometry = patch.patch_geometry(x.shape, layout, patch_range, mode)
    src, q = patch.memory_rows(x, layout)
    out = torch.full_like(x, 77)                              # poisoned
    dst, _ = patch.memory_rows(out, layout)
    unit = patch._widest_unit(q, src, dst)
    words = patch._UNIT_DTYPES[unit]
    dst_sim = cuda.to_device(dst.view(words).numpy())
    n = x.shape[0]
    patch.launch_cuda(cuda.to_device(src.view(words).numpy()), dst_sim,
                      cuda.to_device(np.zeros((n, geometry.max_tiles, 2), np.int32)),
                      cuda.to_device(np.zeros(n, np.int32)), geometry, q, seed, step,
                      blocks=blocks, threads=threads)
    dst.view(words).copy_(torch.from_numpy(dst_sim.copy_to_host()))
    return out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_patch_kernel_equals_cpu(dtype, layout, channels_last):
    x = _images(dtype, layout, channels_last)
    got = _simulated_patch(x, layout, "sample", seed=11, step=3, blocks=(5, 2), threads=(8, 2))
    assert torch.equal(got, patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=11,
                                            step=3))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_patch_kernel_permute_equals_cpu(layout):
    x = _images(torch.bfloat16, layout, channels_last=True, seed=1)
    got = _simulated_patch(x, layout, "permute", seed=2, step=0, blocks=(7, 1), threads=(4, 3))
    assert torch.equal(got, patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=2,
                                            mode="permute"))


def test_patch_kernel_default_launch_shape():
    x = _images(torch.uint8, "nhwc", False, shape=(2, 9, 10, 1))
    got = _simulated_patch(x, "nhwc", "sample", seed=0, step=0, blocks=None, threads=(32, 4),
                           patch_range=(2, 4))
    assert torch.equal(got, patch_negatives(x, layout="nhwc", patch_range=(2, 4), seed=0))


def _simulated_textures(bank, ids, size, seed, step, blocks, threads, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)):
    from numba import cuda
    out = cuda.to_device(np.full((ids.shape[0], size, size, 3), 77, np.uint8))
    textures.launch_cuda(cuda.to_device(bank.numpy()), cuda.to_device(ids.numpy()), out,
                         cuda.to_device(np.zeros((ids.shape[0], textures.PARAMS), np.int32)),
                         textures._log_ratio(scale, ratio), seed, step, blocks=blocks,
                         threads=threads)
    return torch.from_numpy(out.copy_to_host())


def test_texture_kernel_equals_cpu():
    g = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (3, H, W, 3), generator=g, dtype=torch.uint8)
    ids = torch.tensor([2, 0, 1, 2])
    for size, seed, step, blocks, threads in [(29, 0, 0, (6, 1), 16), (13, 5, 2, (3, 2), 8)]:
        got = _simulated_textures(bank, ids, size, seed, step, blocks, threads)
        assert torch.equal(got, sample_textures(bank, ids, size=size, seed=seed, step=step))
    got = _simulated_textures(bank, ids, 11, 1, 0, (4, 1), 16, scale=(0.05, 0.5), ratio=(0.5, 2))
    assert torch.equal(got, sample_textures(bank, ids, size=11, scale=(0.05, 0.5), ratio=(0.5, 2),
                                            seed=1))


def test_texture_kernel_out_of_range_id_is_black():
    bank = torch.full((2, 9, 9, 3), 200, dtype=torch.uint8)
    got = _simulated_textures(bank, torch.tensor([1, 2, -1]), 5, 0, 0, (3, 1), 8)
    assert (got[0] == 200).all() and not got[1:].any()
