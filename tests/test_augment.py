"""fastneg.augment against torchvision.transforms.v2, its fused CPU kernel against its torch path,
its draws, determinism and input checks."""
import importlib.util
import json
import math
from pathlib import Path

import numba
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fastneg import augment
from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD, AugParams, MoCoV2Augment, torch_ops

N, H, W = 6, 30, 38          # H != W catches swapped axes


@pytest.fixture(scope="module")
def images():
    """uint8 [N, H, W, 3]: smooth colour gradients plus noise, so that every op changes pixels."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx], -1) * 200
    noise = torch.rand((N, H, W, 3), generator=g) * 55
    return (base + noise).round().to(torch.uint8)


def blank_params(n=N, **changes) -> AugParams:
    """Draws that switch every op off; `changes` switch some on."""
    fields = dict(flip=torch.zeros(n, dtype=torch.bool), jitter_on=torch.zeros(n, dtype=torch.bool),
                  brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n),
                  hue=torch.zeros(n), order=torch.arange(4).repeat(n, 1),
                  gray=torch.zeros(n, dtype=torch.bool), blur_on=torch.zeros(n, dtype=torch.bool),
                  sigma=torch.ones(n))
    fields.update(changes)
    return AugParams(**fields)


def to_unit(y):
    """Undo the normalization: [N, 3, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return y.float() * std + mean


def chw(x):
    return x.permute(0, 3, 1, 2)


APPLIED = torch.tensor([True, False, True, True, False, True])
FACTORS = torch.tensor([0.6, 1.3, 1.4, 0.75, 0.9, 1.17])     # inside ColorJitter(0.4) ranges
HUES = torch.tensor([-0.1, 0.08, 0.1, 0.035, -0.05, -0.07])
ORDERS = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3], [1, 3, 0, 2],
                       [2, 0, 3, 1], [0, 2, 1, 3], [3, 1, 0, 2]])

JITTER_OPS = {
    "brightness": (TF.adjust_brightness, FACTORS),
    "contrast": (TF.adjust_contrast, FACTORS),
    "saturation": (TF.adjust_saturation, FACTORS),
    "hue": (TF.adjust_hue, HUES),
}


@pytest.mark.parametrize("op", list(JITTER_OPS))
def test_jitter_op_matches_torchvision(images, op):
    """One jitter op on, the others at identity, on some samples of the batch and not others."""
    fn, values = JITTER_OPS[op]
    params = blank_params(jitter_on=APPLIED, order=ORDERS, **{op: values})
    ours = to_unit(MoCoV2Augment().apply(images, params))
    for i in range(N):
        x = chw(images)[i]
        ref_u8 = fn(x, values[i].item()) if APPLIED[i] else x
        ref = fn(x / 255, values[i].item()) if APPLIED[i] else x / 255
        torch.testing.assert_close(ours[i], ref, atol=3e-5, rtol=0)
        # torchvision's uint8 path truncates (and floors the grey) after the op: within 1 level
        assert (ours[i] * 255).round().sub(ref_u8.float()).abs().max() <= 1


def test_grayscale_blur_flip_match_torchvision(images):
    gray = torch.tensor([True, False, False, True, True, False])
    blur = torch.tensor([True, True, False, False, True, True])
    flip = torch.tensor([False, True, True, False, True, False])
    sigma = torch.tensor([0.1, 2.0, 1.0, 0.7, 1.3, 0.45])
    params = blank_params(gray=gray, blur_on=blur, flip=flip, sigma=sigma)
    ours = to_unit(MoCoV2Augment().apply(images, params))
    kernel = [augment.blur_kernel_size(W), augment.blur_kernel_size(H)]
    for i in range(N):
        ref = chw(images)[i] / 255
        if flip[i]:
            ref = TF.hflip(ref)
        if gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if blur[i]:
            ref = TF.gaussian_blur(ref, kernel, [sigma[i].item()] * 2)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def torchvision_reference(x, p):
    """aug-plus per sample with torchvision.transforms.v2.functional and the same draws."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(x.shape[0]):
        im = x[i].permute(2, 0, 1) / 255
        if p.flip[i]:
            im = TF.hflip(im)
        if p.jitter_on[i]:
            factors = [p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i]]
            for op in p.order[i].tolist():
                im = ops[op](im, factors[op].item())
        if p.gray[i]:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if p.blur_on[i]:
            k = [augment.blur_kernel_size(im.shape[2]), augment.blur_kernel_size(im.shape[1])]
            im = TF.gaussian_blur(im, k, [p.sigma[i].item()] * 2)
        out.append(TF.normalize(im, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


def test_whole_pipeline_matches_torchvision_per_sample():
    """Sampled draws, random op orders, every op mixed on and off within one batch."""
    n = 40
    x = torch.randint(0, 256, (n, 20, 26, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    aug = MoCoV2Augment()
    p = aug.sample(n, seed=7, step=3)
    for flags in (p.flip, p.jitter_on, p.gray, p.blur_on):
        assert 0 < int(flags.sum()) < n             # the batch mixes applied and skipped
    assert len({tuple(o) for o in p.order.tolist()}) > 10
    y = aug.apply(x, p)
    torch.testing.assert_close(y, torchvision_reference(x, p), atol=2e-4, rtol=0)


def mixed_images(n, h, w):
    """Random pixels plus the edge cases of the formulas: a grey row (no hue), a row where red
    and green tie for the maximum, a row of pure colours (0 and 255: clamps, sector borders)."""
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(3))
    x[:, 0] = x[:, 0, :, :1]
    x[:, h // 2, :, 1] = x[:, h // 2, :, 0].clamp(min=x[:, h // 2, :, 2])
    x[:, -1] = torch.tensor([[255, 0, 0], [0, 255, 255], [255, 255, 0]],
                            dtype=torch.uint8).repeat(w, 1)[:w]
    return x


@pytest.mark.parametrize("h, w, jitter", [
    (37, 50, (0.4, 0.4, 0.4, 0.1)),     # odd sizes, the MoCo-v2 ranges
    (37, 50, (0.9, 0.9, 0.9, 0.5)),     # wide ranges: clamps everywhere, hue all the way round
    (2, 3, (0.4, 0.4, 0.4, 0.1)),       # the smallest image: blur radius 1, reflect at once
])
def test_fused_cpu_kernel_equals_torch_path(h, w, jitter):
    """apply() on CPU (one Numba kernel) against the batched torch ops, the same draws."""
    n = 48
    aug = MoCoV2Augment(jitter=jitter)
    p = aug.sample(n, seed=11, step=2)
    for flags in (p.flip, p.jitter_on, p.gray, p.blur_on):
        assert 0 < int(flags.sum()) < n             # the batch mixes applied and skipped
    assert len({tuple(o) for o in p.order.tolist()}) > 10
    # contrast (the op that needs a pass of its own) at every position, after other ops or not
    contrast_at = (p.order == augment.CONTRAST).long().argmax(1)
    assert set(contrast_at[p.jitter_on].tolist()) == {0, 1, 2, 3}
    x = mixed_images(n, h, w + 1)[:, :, 1:]        # a strided view, as a crop might hand over
    assert not x.is_contiguous()
    fused, reference = aug.apply(x, p), aug._apply_torch(x, p)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=0)


def test_fused_cpu_kernel_skips_ops_as_the_torch_path_does(images):
    """An op with probability 0 (or hue strength 0) is off whatever the draws say."""
    p = MoCoV2Augment(jitter_p=1.0, gray_p=0.5, blur_p=0.5).sample(N, seed=1, step=0)
    assert p.jitter_on.all() and p.flip.any() and p.gray.any() and p.blur_on.any()
    for aug in (MoCoV2Augment(flip_p=0, jitter_p=0, gray_p=0, blur_p=0),
                MoCoV2Augment(jitter=(0.4, 0.4, 0.4, 0.0))):
        torch.testing.assert_close(aug.apply(images, p), aug._apply_torch(images, p),
                                   atol=1e-4, rtol=0)
    plain = (chw(images) / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(MoCoV2Augment(flip_p=0, jitter_p=0, gray_p=0, blur_p=0)
                               .apply(images, p), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["apply", "_apply_torch"])
def test_output_layout_and_dtype(images, path):
    p = MoCoV2Augment().sample(N, seed=0, step=0)
    whole = getattr(MoCoV2Augment(), path)(images, p)
    assert whole.shape == (N, 3, H, W) and whole.dtype == torch.float32
    assert whole.is_contiguous(memory_format=torch.channels_last)
    half = getattr(MoCoV2Augment(dtype=torch.bfloat16), path)(images, p)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half.float(), whole, atol=0.02, rtol=0.01)


def test_torch_path_chunks_and_fused_threads_do_not_change_the_result(images, monkeypatch):
    aug = MoCoV2Augment()
    p = aug.sample(N, seed=0, step=0)
    whole = aug._apply_torch(images, p)
    monkeypatch.setattr(torch_ops, "CPU_CHUNK_BYTES", 1)        # one image per chunk
    assert torch.equal(aug._apply_torch(images, p), whole)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = aug.apply(images, p)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert torch.equal(aug.apply(images, p), one)           # each sample on one thread
    finally:
        numba.set_num_threads(threads)


def test_blur_of_chosen_rows_equals_identity_kernel_path(images):
    """The CPU path (blur only chosen rows) and the sync-free CUDA path (all rows) agree."""
    img = chw(images).float().contiguous()
    on = torch.tensor([True, False, True, False, False, True])
    sigma = torch.linspace(0.1, 2.0, N)
    rows = torch_ops._gaussian_blur(img.clone(), sigma, on, rows_only=True)
    every = torch_ops._gaussian_blur(img.clone(), sigma, on, rows_only=False)
    torch.testing.assert_close(rows, every, atol=1e-3, rtol=0)
    assert torch.equal(rows[~on], img[~on]) and not torch.allclose(rows[on], img[on])


def rate_ok(flags, p):
    """Observed rate within 3 standard errors of p."""
    n = flags.numel()
    return abs(flags.float().mean().item() - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("config", [
    {},
    dict(flip_p=0.3, jitter=(0.2, 0.5, 1.2, 0.05), jitter_p=0.6, gray_p=0.1,
         blur_sigma=(0.5, 1.5), blur_p=0.7),
])
def test_sampled_parameters_follow_their_distributions(config):
    aug = MoCoV2Augment(**config)
    n = 20_000
    p = aug.sample(n, seed=123, step=4)
    assert rate_ok(p.flip, aug.flip_p) and rate_ok(p.jitter_on, aug.jitter_p)
    assert rate_ok(p.gray, aug.gray_p) and rate_ok(p.blur_on, aug.blur_p)
    b, c, s, h = aug.jitter
    ranges = [(p.brightness, max(0, 1 - b), 1 + b), (p.contrast, max(0, 1 - c), 1 + c),
              (p.saturation, max(0, 1 - s), 1 + s), (p.hue, -h, h), (p.sigma, *aug.blur_sigma)]
    for v, lo, hi in ranges:
        width = hi - lo
        assert lo <= v.min() and v.max() <= hi
        assert v.min() < lo + 0.01 * width and v.max() > hi - 0.01 * width   # fills the range
        assert rate_ok(v < lo + width / 2, 0.5)                               # uniform-ish
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    for op in range(4):
        for pos in range(4):
            assert rate_ok(p.order[:, pos] == op, 0.25)
    assert len({tuple(o) for o in p.order.tolist()}) == 24


def test_draws_are_deterministic_and_keyed_by_seed_step_view_first(images):
    aug = MoCoV2Augment()
    a = aug(images, seed=5, step=9)
    assert torch.equal(a, aug(images, seed=5, step=9))
    for other in (dict(seed=6, step=9), dict(seed=5, step=10), dict(seed=5, step=9, view=1)):
        assert not torch.equal(a, aug(images, **other))
    # `first` shifts the sample counter: rows of a larger draw, so ranks can own disjoint ranges
    big, part = aug.sample(10, seed=5, step=9), aug.sample(4, seed=5, step=9, first=6)
    for name in ("flip", "brightness", "hue", "order", "sigma"):
        assert torch.equal(getattr(big, name)[6:], getattr(part, name))


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.float(), "uint8"),
    (lambda x: x.permute(0, 3, 1, 2), "NCHW"),
    (lambda x: torch.cat([x, x[..., :1]], -1), "3 channels"),
    (lambda x: x[0], r"\[N, H, W, 3\]"),
])
def test_bad_images_raise_clear_errors(images, bad, message):
    aug = MoCoV2Augment()
    with pytest.raises(ValueError, match=message):
        aug.apply(bad(images), aug.sample(N, seed=0, step=0))


def test_bad_arguments_raise_clear_errors(images):
    aug = MoCoV2Augment()
    with pytest.raises(ValueError, match="params hold 3 samples"):
        aug.apply(images, aug.sample(3, seed=0, step=0))
    with pytest.raises(ValueError, match="seed"):
        aug.sample(2, seed=-1, step=0)
    for kwargs, message in [(dict(gray_p=1.5), "gray_p"),
                            (dict(jitter=(0.4, 0.4, 0.4, 0.6)), "hue"),
                            (dict(blur_sigma=(0, 1)), "blur_sigma"),
                            (dict(dtype=torch.int8), "dtype"), (dict(std=(1, 1)), "std")]:
        with pytest.raises(ValueError, match=message):
            MoCoV2Augment(**kwargs)


@pytest.mark.cuda
def test_cuda_matches_cpu(images):
    aug = MoCoV2Augment()
    cpu = aug.apply(images, aug.sample(N, seed=2, step=1))
    gpu = aug.apply(images.cuda(), aug.sample(N, seed=2, step=1, device="cuda"))
    assert gpu.is_cuda and gpu.is_contiguous(memory_format=torch.channels_last)
    # atol: cuDNN may run the blur in TF32 (PyTorch default), ~0.1 grey level after / std
    torch.testing.assert_close(gpu.cpu(), cpu, atol=5e-3, rtol=0)
    half = MoCoV2Augment(dtype=torch.bfloat16).apply(images.cuda(),
                                                     aug.sample(N, seed=2, step=1, device="cuda"))
    torch.testing.assert_close(half.float().cpu(), cpu, atol=0.02, rtol=0.01)


def test_benchmark_reports_both_paths_per_thread_count(tmp_path):
    """benchmarks/augment.py smoke run: every side timed at every thread count, in its JSON."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "augment.py"
    spec = importlib.util.spec_from_file_location("bench_augment", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "augment.json"
    threads = torch.get_num_threads(), numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS
    try:                                  # main() sets both libraries' thread counts
        assert bench.main(["--batch", "3", "--size", "16", "--repeats", "1",
                           "--baseline-images", "2", "--threads", f"1,{most}", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    result = json.loads(out.read_text())
    assert [r["threads"] for r in result["runs"]] == [1, most]
    for run in result["runs"]:
        for side in ("fused", "torch", "torchvision"):
            assert run[f"{side}_ms_per_img"] > 0 and run[f"{side}_cpu_ms_per_img"] > 0
        assert run["speedup_fused_vs_torch"] == pytest.approx(
            run["torch_ms_per_img"] / run["fused_ms_per_img"])


def test_constants_reach_a_gpu_by_a_non_blocking_copy_from_pinned_memory(monkeypatch, images):
    # torch.tensor(values, device="cuda") copies from pageable memory and blocks the host; the
    # first apply() on a GPU uploaded its constants that way (a sync under sync-debug "error")
    from fastneg import augment
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False:
                        copies.append((torch.device(device), non_blocking)) or self)
    aug = MoCoV2Augment()
    scale, shift = aug._normalization(torch.device("cuda", 0))
    luma = augment.to_device(augment.LUMA, torch.device("cuda", 0))
    assert copies == [(torch.device("cuda", 0), True)] * 3
    assert torch.equal(luma, torch.tensor(augment.LUMA, dtype=torch.float32))
    assert scale.shape == shift.shape == (1, 3, 1, 1)


def test_the_cpu_kernel_cache_key_covers_the_pixel_formulas():
    """The fused CPU kernel inlines fastneg.augment.pixels: an edit there must miss its disk cache."""
    from fastneg.augment import cpu, pixels
    from fastneg.kernels import jit
    cache = cpu.fused_aug_plus._cache
    if not isinstance(cache, jit._KeyedCache):
        pytest.skip("no writable Numba cache location")
    files = [cpu.__file__, *jit.KERNELS_DIR.glob("*.py")]
    assert cache._cache_file._source_stamp[1] == jit.source_key(files + [pixels.__file__])
    assert cache._cache_file._source_stamp[1] != jit.source_key(files)
