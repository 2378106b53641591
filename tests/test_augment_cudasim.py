"""fastneg.augment.cuda (the fused aug-plus CUDA kernel) under Numba's CUDA simulator, against
the fused CPU kernel on the same packed draws. Run in its own process with
NUMBA_ENABLE_CUDASIM=1 (make test does)."""
import numpy as np
import pytest
import torch

from fastneg import augment
from fastneg.augment import MoCoV2Augment, torch_ops
from fastneg.augment import cpu as augment_cpu
from fastneg.augment import cuda as augment_cuda

pytestmark = pytest.mark.cudasim


def _packed(aug, p, h, w):
    """The kernels' inputs, as MoCoV2Augment._apply_fused_cpu packs them."""
    flags = torch.stack([p.flip, p.jitter_on, p.gray, p.blur_on], 1).to(torch.uint8).numpy()
    factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue], 1).float().numpy()
    kernel_x = torch_ops._gaussian_kernels(p.sigma.float(), augment.blur_kernel_size(w)).numpy()
    kernel_y = torch_ops._gaussian_kernels(p.sigma.float(), augment.blur_kernel_size(h)).numpy()
    scale, shift = (t.view(3).numpy() for t in aug._normalization(torch.device("cpu")))
    return (flags, factors, p.order.to(torch.int64).contiguous().numpy(), kernel_x, kernel_y,
            np.array(augment.LUMA, np.float32), scale, shift)


def _simulated(x, packed, threads, blocks=None):
    from numba import cuda
    n, h, w, _ = x.shape
    out = cuda.to_device(np.full((n, h, w, 3), np.nan, np.float32))      # poisoned
    scratch = cuda.to_device(np.full((n, h, 3, w), np.nan, np.float32))
    augment_cuda.launch(cuda.to_device(x), *(cuda.to_device(a) for a in packed), scratch, out,
                        blocks=blocks, threads=threads)
    return out.copy_to_host()


def _cpu(x, packed):
    n, h, w, _ = x.shape
    out = np.empty((n, h, w, 3), np.float32)
    scratch = np.empty((augment_cpu.numba.get_num_threads(), h, 3, w), np.float32)
    augment_cpu.fused_aug_plus(x, *packed, scratch, out)
    return out


def _images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx], -1) * 200
    return (base + torch.rand((n, h, w, 3), generator=g) * 55).round().to(torch.uint8).numpy()


def test_two_16px_images_every_op_on_equal_the_cpu_kernel():
    aug = MoCoV2Augment()
    on = torch.ones(2, dtype=torch.bool)
    # every op applied, contrast after other ops in one sample and first in the other
    p = augment.AugParams(flip=torch.tensor([True, False]), jitter_on=on,
                          brightness=torch.tensor([0.7, 1.3]), contrast=torch.tensor([1.35, 0.65]),
                          saturation=torch.tensor([0.6, 1.4]), hue=torch.tensor([0.08, -0.1]),
                          order=torch.tensor([[3, 0, 1, 2], [1, 2, 3, 0]]),
                          gray=torch.tensor([False, True]), blur_on=on,
                          sigma=torch.tensor([0.8, 1.7]))
    x = _images(2, 16, 16)
    packed = _packed(aug, p, 16, 16)
    got = _simulated(x, packed, threads=32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, _cpu(x, packed), atol=1e-4, rtol=0)


def test_sampled_batch_with_grid_stride_and_odd_sizes_equals_the_cpu_kernel():
    aug = MoCoV2Augment(jitter=(0.9, 0.9, 0.9, 0.5))   # wide ranges: clamps, hue all round
    n, h, w = 6, 9, 13
    p = aug.sample(n, seed=3, step=1)
    x = _images(n, h, w, seed=1)
    packed = _packed(aug, p, h, w)
    # 2 blocks for 6 samples: each block walks three; 16 threads for 117 pixels
    got = _simulated(x, packed, threads=16, blocks=2)
    np.testing.assert_allclose(got, _cpu(x, packed), atol=1e-4, rtol=0)


def test_launch_rejects_what_the_kernel_cannot_hold():
    x = np.zeros((1, 2, augment_cuda.MAX_WIDTH + 1, 3), np.uint8)
    with pytest.raises(ValueError, match="MAX_WIDTH"):
        augment_cuda.launch(x, *[None] * 10)
    with pytest.raises(ValueError, match="threads"):
        augment_cuda.launch(x[:, :, :4], *[None] * 10, threads=augment_cuda.THREADS + 1)
