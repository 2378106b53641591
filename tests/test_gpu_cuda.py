"""On a real NVIDIA GPU only (marker cuda): what the Numba simulator cannot show. The CUDA
kernels on torch's current stream when that is not the default stream, and on a second device
(the stream is wrapped inside that device's context)."""
import pytest
import torch

from fastneg.kernels import patch_negatives, sample_textures

pytestmark = pytest.mark.cuda


def _batch(n=6, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def test_kernels_run_on_torchs_current_side_stream():
    x = _batch()
    want = patch_negatives(x, layout="nhwc", patch_range=(4, 12), seed=1, step=2)
    bank, ids = _batch(3, 50, seed=1), torch.tensor([2, 0, 1, 1])
    want_tex = sample_textures(bank, ids, size=24, seed=1, step=2)
    source = x.cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        xc = torch.zeros_like(source)
        # the input is filled on the side stream behind a long busy-wait: a kernel launched on
        # any other stream would read it before the copy lands
        torch.cuda._sleep(50_000_000)
        xc.copy_(source)
        got = patch_negatives(xc, layout="nhwc", patch_range=(4, 12), seed=1, step=2)
        tex = sample_textures(bank.cuda(), ids.cuda(), size=24, seed=1, step=2, check_ids=False)
    side.synchronize()
    assert torch.equal(got.cpu(), want) and torch.equal(tex.cpu(), want_tex)


def test_kernels_on_a_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = _batch()
    want = patch_negatives(x, layout="nhwc", patch_range=(4, 12), seed=1, step=2)
    torch.cuda.set_device(0)      # the current device is not the tensor's
    got = patch_negatives(x.to("cuda:1"), layout="nhwc", patch_range=(4, 12), seed=1, step=2)
    torch.cuda.synchronize(1)
    assert got.device.index == 1 and torch.equal(got.cpu(), want)


def test_fused_augment_kernel_equals_the_torch_chain_without_host_syncs():
    from fastneg.augment import MoCoV2Augment
    whole = _batch(16, 41)
    x, xc = whole[:, :, 1:], whole.cuda()[:, :, 1:]   # strided views, as a crop might hand over
    assert not xc.is_contiguous()
    aug = MoCoV2Augment()
    p = aug.sample(16, seed=4, step=2, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")     # any host sync in apply() would raise
    try:
        fused = aug.apply(xc, p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fused.is_contiguous(memory_format=torch.channels_last) and fused.dtype == torch.float32
    # the torch chain's blur is cuDNN (TF32 by default): a tenth of a grey level
    torch.testing.assert_close(fused, aug._apply_torch(xc, p), atol=5e-3, rtol=0)
    torch.testing.assert_close(fused.cpu(), aug.apply(x, p.to("cpu")), atol=1e-4, rtol=0)
    half = MoCoV2Augment(dtype=torch.bfloat16).apply(xc, p)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), fused, atol=0.02, rtol=0.01)
