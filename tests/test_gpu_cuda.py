"""On a real NVIDIA GPU only (marker cuda): what the Numba simulator cannot show. The CUDA
kernels on torch's current stream when that is not the default stream, and on a second device
(the stream is wrapped inside that device's context); the torch loader's nvJPEG decode against
torch's caching allocator."""
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


# ------------------------------------------------- nvJPEG decode and torch's allocator

def _jpegs(n, side, seed=0):
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # smooth content (a gradient plus mild noise): a JPEG close to its source
        base = np.linspace(0, 200, side, dtype=np.float32)[None, :, None] + \
            rng.normal(0, 8, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def _pil_decode(encoded):
    import io

    import numpy as np
    from PIL import Image
    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_gpu_decode_never_writes_memory_queued_work_still_reads():
    """torchvision's decode_jpeg(device="cuda") allocates its outputs on the caller's current
    stream but writes them on a pool stream that does not wait for the caller's (torchvision
    0.26 to 0.29, decode_jpegs_cuda.cpp; upstream vision PR 9606, closed unmerged). A block
    freed while queued kernels still read it goes straight to the decoder. The loader's
    _decode_jpeg_gpu waits for the current stream first: the queued reads must see their
    data, not decoded pixels."""
    from fastneg.loaders.torch_loader import _decode_jpeg_gpu
    side, n = 512, 4
    encoded = _jpegs(n, side)
    device = torch.device("cuda", torch.cuda.current_device())
    _decode_jpeg_gpu(encoded[:1], device)          # the decoder's one-time set-up
    torch.cuda.synchronize()
    numel = 3 * side * side // 4                   # float32 blocks the size of one output
    victims = [torch.full((numel,), 1.0, device=device) for _ in range(n)]
    torch.cuda._sleep(2 ** 30)                     # the reads below run ~0.5 s from now
    sums = [v.sum() for v in victims]
    del victims                                    # freed on this stream, reads still queued
    decoded = _decode_jpeg_gpu(encoded, device)
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [float(numel)] * n
    for got, e in zip(decoded, encoded):
        ref = _pil_decode(e)
        assert got.shape == (3, side, side)
        # nvJPEG's and libjpeg's IDCTs differ by a level or two, not more
        assert (got.cpu().float() - ref.float()).abs().mean() < 2


# ------------------------------------------------- one rank, one GPU

_SECOND_GPU_ONLY = r"""
import sys
import torch
torch.cuda.set_device(1)                       # what the trainer does on local rank 1
from fastneg.augment import MoCoV2Augment
from fastneg.loaders import build_loader
from fastneg.step import make_views_and_negatives
kind, data = sys.argv[1], sys.argv[2]
if kind == "ffcv":       # written before any Loader runs in this process (LOADER-NOTES.md)
    from fastneg.data.convert import convert_to_beton
    data = convert_to_beton(data, sys.argv[3], progress=False, workers=1)
loader = build_loader(kind, data, batch_size=8, size=32, device="cuda:1", workers=2)
loader.set_epoch(0)
for batch in loader:
    assert batch.views[0].device == torch.device("cuda", 1)
    make_views_and_negatives(batch, aug=MoCoV2Augment(), seed=0, step=0, patch_range=(4, 12))
torch.cuda.synchronize(1)
print("context on GPU 0:", torch._C._cuda_hasPrimaryContext(0))
"""


@pytest.mark.parametrize("kind", ["torch", "ffcv", "dali"])
def test_a_rank_on_gpu_1_makes_no_context_on_gpu_0(kind, tmp_path):
    """Every thread a loader starts (the torch loader's prefetch thread and its DataLoader's
    pin-memory thread, FFCV's loading thread, DALI's) and the Numba launches must stay on the
    rank's GPU: a context on GPU 0 costs each rank ~0.5 GB there, 8 ranks 4 GB."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from fastneg.loaders import available_kinds
    if kind not in available_kinds():
        pytest.skip(f"{kind} is not installed")
    from fastneg.data.synthetic import DatasetSpec, make_dataset
    root = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=4, size=48),
                        progress=False)
    data = root / "train" if (root / "train").exists() else root
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _SECOND_GPU_ONLY, kind, str(data),
                           str(tmp_path / "train.beton")], env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "context on GPU 0: False" in done.stdout, done.stdout
