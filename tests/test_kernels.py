"""fastneg.kernels on the CPU (and on a real GPU when there is one): references, properties, errors.

The CUDA kernels under Numba's simulator are in test_kernels_cudasim.py.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
try:
    from scipy import stats
except ImportError:     # a bare GPU machine has no scipy; its `cuda` tests do not need it
    stats = None
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from fastneg.kernels import patch_negatives, reference, sample_textures
from fastneg.kernels.patch import draw_patch_tiles
from fastneg.kernels.textures import draw_texture_params

H, W = 37, 50                  # odd, unequal sides
PATCH_RANGE = (3, 12)
DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def images(n, c=3, dtype=torch.uint8, layout="nhwc", channels_last=False, seed=0, high=255):
    """Random [N, H, W, C] (or [N, C, H, W]) batch in the requested memory order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, high, (n, H, W, c), generator=g, dtype=torch.uint8).to(dtype)
    if layout == "nchw":
        x = x.permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last if channels_last else
                            torch.contiguous_format)
    # NHWC logical order over planar (NCHW) memory is the nhwc "channels_last" counterpart.
    return x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) if channels_last else x


# ---------------------------------------------------------------- patch_negatives

@pytest.mark.parametrize("mode", ["sample", "permute"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_matches_reference(dtype, layout, channels_last, mode):
    x = images(3, dtype=dtype, layout=layout, channels_last=channels_last)
    for seed, step in [(0, 0), (1, 7), (2 ** 40 + 3, 123456)]:
        got = patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=seed, step=step,
                              mode=mode)
        want = reference.patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=seed,
                                         step=step, mode=mode)
        assert got.stride() == x.stride()        # memory order kept
        assert torch.equal(got, want), (seed, step)


@pytest.mark.parametrize("channels", [1, 4])
def test_patch_matches_reference_other_channel_counts(channels):
    for layout, channels_last in [("nhwc", False), ("nchw", False), ("nchw", True)]:
        x = images(2, c=channels, layout=layout, channels_last=channels_last)
        got = patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=4)
        assert torch.equal(got, reference.patch_negatives(x, layout=layout,
                                                          patch_range=PATCH_RANGE, seed=4))


def _tile_blocks(out_image, d):
    """((ty, tx), block) for each tile of the n_h x n_w grid, cropped to the image."""
    h, w = out_image.shape[:2]
    for ty in range(h // d + 1):
        for tx in range(w // d + 1):
            block = out_image[ty * d:(ty + 1) * d, tx * d:(tx + 1) * d]
            if block.numel():
                yield (ty, tx), block


def _matching_offsets(image, block, rows, cols):
    """(y, x) with y < rows, x < cols where image[y:, x:] starts with `block`."""
    bh, bw = block.shape[:2]
    windows = image.unfold(0, bh, 1).unfold(1, bw, 1)[:rows, :cols]   # [rows, cols, C, bh, bw]
    hits = (windows == block.permute(2, 0, 1)).flatten(2).all(-1)
    return hits.nonzero().tolist()


def test_every_tile_is_a_window_at_a_legal_offset():
    lo, hi = 4, 15
    x = torch.rand(4, H, W, 3, generator=torch.Generator().manual_seed(1))   # distinct values
    out = patch_negatives(x, layout="nhwc", patch_range=(lo, hi), seed=9, step=2)
    sizes, _ = draw_patch_tiles(4, H, W, patch_range=(lo, hi), seed=9, step=2)
    for i, d in enumerate(sizes.tolist()):
        assert lo <= d <= hi
        for _, block in _tile_blocks(out[i], d):
            # 0 <= y < H - d and 0 <= x < W - d, and exactly one such window (values are distinct)
            assert len(_matching_offsets(x[i], block, H - d, W - d)) == 1


def test_permute_mode_is_a_jigsaw_of_the_full_tiles():
    x = torch.rand(3, H, W, 2, generator=torch.Generator().manual_seed(2))
    out = patch_negatives(x, layout="nhwc", patch_range=(5, 11), seed=3, mode="permute")
    sizes, _ = draw_patch_tiles(3, H, W, patch_range=(5, 11), seed=3, mode="permute")
    for i, d in enumerate(sizes.tolist()):
        grid = H // d, W // d
        used = []
        for (ty, tx), block in _tile_blocks(out[i], d):
            if ty < grid[0] and tx < grid[1]:
                (y, x0), = _matching_offsets(x[i], block, H, W)
                assert y % d == 0 and x0 % d == 0
                used.append((y // d, x0 // d))
            else:   # strips past the full grid stay in place
                assert torch.equal(block, x[i, ty * d:(ty + 1) * d, tx * d:(tx + 1) * d])
        assert sorted(used) == [(a, b) for a in range(grid[0]) for b in range(grid[1])]
        assert used != sorted(used) or len(used) == 1      # actually shuffled


def test_patch_size_and_corners_are_uniform():
    lo, hi, side, n = 16, 72, 224, 20000
    sizes, corners = draw_patch_tiles(n, side, side, patch_range=(lo, hi), seed=0)
    counts = np.bincount(sizes - lo, minlength=hi - lo + 1)
    assert counts.size == hi - lo + 1 and counts.min() > 0
    assert stats.chisquare(counts).pvalue > 1e-3
    # corners of the samples that drew d = lo: every one legal, top rows uniform on [0, side - lo)
    tiles = (side // lo + 1) ** 2
    chosen = corners[sizes == lo, :tiles].reshape(-1, 2)
    assert chosen.min() >= 0 and chosen.max() < side - lo
    assert stats.chisquare(np.bincount(chosen[:, 0], minlength=side - lo)).pvalue > 1e-3


def test_counters_decide_the_output():
    one = images(1, dtype=torch.float32)
    x = one.repeat(4, 1, 1, 1)                 # four identical samples
    kwargs = dict(layout="nhwc", patch_range=PATCH_RANGE)
    base = patch_negatives(x, seed=5, step=1, **kwargs)
    assert torch.equal(base, patch_negatives(x, seed=5, step=1, **kwargs))
    for a in range(4):                         # sample index matters
        for b in range(a + 1, 4):
            assert not torch.equal(base[a], base[b])
    assert not torch.equal(base, patch_negatives(x, seed=6, step=1, **kwargs))
    assert not torch.equal(base, patch_negatives(x, seed=5, step=2, **kwargs))
    # a sample's negative depends on its row index only, not on the rest of the batch
    assert torch.equal(base[:1], patch_negatives(one, seed=5, step=1, **kwargs))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_patch_overwrites_a_poisoned_output(layout):
    x = images(3, layout=layout, high=255)     # values 0..254
    out = torch.full_like(x, 255)
    patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=1, out=out)
    assert not (out == 255).any()
    assert torch.equal(out, reference.patch_negatives(x, layout=layout, patch_range=PATCH_RANGE,
                                                      seed=1))
    xf = x.float()
    outf = torch.full_like(xf, float("nan"))
    assert patch_negatives(xf, layout=layout, patch_range=PATCH_RANGE, seed=1, out=outf) is outf
    assert torch.equal(outf, out.float())


def _patch_errors():
    x = images(2)
    planar = images(2, channels_last=True)
    ok = dict(layout="nhwc", patch_range=PATCH_RANGE, seed=0)
    return {
        "3-D input": (x[0], ok, "4-D"),
        "layout": (x, {**ok, "layout": "hwc"}, "layout"),
        "mode": (x, {**ok, "mode": "jigsaw"}, "mode"),
        "lo > hi": (x, {**ok, "patch_range": (9, 8)}, "patch_range"),
        "lo = 0": (x, {**ok, "patch_range": (0, 8)}, "patch_range"),
        "hi = min side": (x, {**ok, "patch_range": (3, H)}, "patch_range"),
        "float range": (x, {**ok, "patch_range": (3.0, 8)}, "patch_range"),
        "dtype bool": (x > 3, ok, "dtype"),
        "dtype complex": (x.to(torch.complex64), ok, "dtype"),
        "negative seed": (x, {**ok, "seed": -1}, "seed"),
        "step not int": (x, {**ok, "step": 1.5}, "step"),
        "not dense": (x[:, :, ::2], ok, "dense"),
        "out shape": (x, {**ok, "out": torch.empty_like(x[1:])}, "out"),
        "out dtype": (x, {**ok, "out": torch.empty_like(x, dtype=torch.float32)}, "out"),
        "out memory order": (x, {**ok, "out": torch.empty_like(planar)}, "memory order"),
        "out is x": (x, {**ok, "out": x}, "overlaps"),
    }


@pytest.mark.parametrize("case", list(_patch_errors()))
def test_patch_bad_input_raises(case):
    x, kwargs, match = _patch_errors()[case]
    with pytest.raises(ValueError, match=match):
        patch_negatives(x, **kwargs)


def test_patch_empty_batch():
    x = torch.empty((0, 3, H, W))
    assert patch_negatives(x, layout="nchw", seed=0, patch_range=PATCH_RANGE).shape == x.shape


# ---------------------------------------------------------------- sample_textures

def bank_of(count=3, h=H, w=W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, h, w, 3), generator=g, dtype=torch.uint8)


IDS = torch.tensor([2, 0, 1, 1, 0, 2])


def test_textures_match_reference():
    bank = bank_of()
    for size, seed, step, scale, ratio in [(29, 0, 0, (0.2, 1.0), (3 / 4, 4 / 3)),
                                           (64, 1, 5, (0.08, 1.0), (0.5, 2.0)),
                                           (17, 2 ** 35, 9, (0.9, 1.0), (1.0, 1.0))]:
        got = sample_textures(bank, IDS, size=size, scale=scale, ratio=ratio, seed=seed, step=step)
        want = reference.sample_textures(bank, IDS, size=size, scale=scale, ratio=ratio,
                                         seed=seed, step=step)
        assert torch.equal(got, want), (size, seed)


def test_textures_agree_with_torchvision_given_the_same_box():
    bank = bank_of()
    worst, flips = 0, 0
    for size, seed in [(29, 0), (64, 1), (23, 2)]:
        out = sample_textures(bank, IDS, size=size, seed=seed)
        params = draw_texture_params(len(IDS), H, W, seed=seed)
        for i, (top, left, ch, cw, flip) in enumerate(params.tolist()):
            want = TF.resized_crop(bank[IDS[i]].permute(2, 0, 1), top, left, ch, cw, [size, size],
                                   interpolation=InterpolationMode.BILINEAR, antialias=False)
            want = TF.horizontal_flip(want) if flip else want
            worst = max(worst, (want.permute(1, 2, 0).int() - out[i].int()).abs().max().item())
            flips += flip
    assert worst <= 1
    assert 0 < flips < 3 * len(IDS)             # both branches exercised


def test_texture_boxes_follow_random_resized_crop():
    h, w, n = 96, 128, 20000
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    params = draw_texture_params(n, h, w, scale=scale, ratio=ratio, seed=0).astype(np.float64)
    torch.manual_seed(0)
    boxes = np.array([RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
                      for _ in range(n)], np.float64)
    for name, feature in [("area", lambda hw: hw[:, 0] * hw[:, 1] / (h * w)),
                          ("log ratio", lambda hw: np.log(hw[:, 1] / hw[:, 0]))]:
        ours, theirs = feature(params[:, 2:4]), feature(boxes[:, 2:4])
        edges = np.histogram_bin_edges(np.concatenate([ours, theirs]), bins=20)
        counts = np.stack([np.histogram(ours, edges)[0], np.histogram(theirs, edges)[0]])
        assert stats.chi2_contingency(counts[:, counts.sum(0) > 0]).pvalue > 1e-3, name
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3, name
    assert (params[:, 0] + params[:, 2] <= h).all() and (params[:, 1] + params[:, 3] <= w).all()
    assert stats.binomtest(int(params[:, 4].sum()), n).pvalue > 1e-3     # fair flips


def test_textures_overwrite_a_poisoned_strided_output():
    bank = bank_of()
    storage = torch.full((len(IDS), 21, 21, 4), 7, dtype=torch.uint8)
    out = storage[..., 1:]                      # strided view: channel 0 must stay untouched
    assert sample_textures(bank, IDS, size=21, seed=3, out=out) is out
    assert torch.equal(out, reference.sample_textures(bank, IDS, size=21, seed=3))
    assert (storage[..., 0] == 7).all()


def test_unchecked_out_of_range_ids_give_black_textures():
    out = sample_textures(bank_of(), torch.tensor([0, 3, -1]), size=9, seed=0, check_ids=False)
    assert out[0].any() and not out[1:].any()


def _texture_errors():
    bank, ok = bank_of(), dict(size=8, seed=0)
    return {
        "id too large": (bank, torch.tensor([0, 3]), ok, r"\[0, 2\]"),
        "negative id": (bank, torch.tensor([-1]), ok, r"\[0, 2\]"),
        "empty bank": (bank[:0], torch.tensor([0]), ok, "empty"),
        "bank dtype": (bank.float(), IDS, ok, "uint8"),
        "bank channels": (bank[..., :2], IDS, ok, r"\[B, h, w, 3\]"),
        "ids dtype": (bank, IDS.int(), ok, "int64"),
        "ids shape": (bank, IDS[None], ok, "int64"),
        "size": (bank, IDS, {**ok, "size": 0}, "size"),
        "scale": (bank, IDS, {**ok, "scale": (0.5, 0.2)}, "scale"),
        "ratio": (bank, IDS, {**ok, "ratio": (0.0, 1.0)}, "ratio"),
        "seed": (bank, IDS, {**ok, "seed": "0"}, "seed"),
        "out shape": (bank, IDS, {**ok, "out": torch.empty(6, 8, 8, 4, dtype=torch.uint8)}, "out"),
    }


@pytest.mark.parametrize("case", list(_texture_errors()))
def test_textures_bad_input_raises(case):
    bank, ids, kwargs, match = _texture_errors()[case]
    with pytest.raises(ValueError, match=match):
        sample_textures(bank, ids, **kwargs)


def test_import_leaves_numba_cuda_alone():
    code = "import sys, fastneg.kernels; sys.exit('numba.cuda' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_benchmark_reports_every_row(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    assert bench.main(["--batch", "2", "--size", "80", "--repeats", "1", "--anchor-samples", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    for r in rows:
        assert r["ms"] > 0 and r["gb_per_s"] > 0 and r["of_copy"] > 0 and r["speedup_vs_loop"] > 0
        assert r["host_us"] > 0 and r["copy_host_us"] > 0 and r["host_bound"] in (False, True)
    with pytest.raises(SystemExit):
        bench.main(["--size", "40"])          # below the paper's patch sizes: a clear usage error


# ---------------------------------------------------------------- real GPU

@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sample", "permute"])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_cuda_patch_equals_cpu(dtype, mode):
    for layout in ("nhwc", "nchw"):
        for channels_last in (False, True):
            x = images(5, dtype=dtype, layout=layout, channels_last=channels_last)
            want = patch_negatives(x, layout=layout, patch_range=PATCH_RANGE, seed=3, step=4,
                                   mode=mode)
            xc = x.cuda()
            torch.cuda.set_sync_debug_mode("error")  # any host sync in the call would raise
            try:
                got = patch_negatives(xc, layout=layout, patch_range=PATCH_RANGE, seed=3, step=4,
                                      mode=mode)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert got.stride() == xc.stride() and torch.equal(got.cpu(), want)


@pytest.mark.cuda
def test_cuda_textures_equal_cpu():
    bank = bank_of(4, 61, 45)
    ids = torch.tensor([3, 0, 2, 1, 1, 3, 0])
    want = sample_textures(bank, ids, size=33, seed=8, step=2)
    bank_gpu, ids_gpu = bank.cuda(), ids.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample_textures(bank_gpu, ids_gpu, size=33, seed=8, step=2, check_ids=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), want)
    assert torch.equal(sample_textures(bank_gpu, ids_gpu, size=33, seed=8, step=2).cpu(), want)
    with pytest.raises(ValueError, match="ids"):
        sample_textures(bank_gpu, torch.tensor([4], device="cuda"), size=8, seed=0)


# ----------------------------------------------------------------- the kernel cache (kernels.jit)

_CACHED_MODULE = """
import dep
from fastneg.kernels.jit import cached_njit

@cached_njit(depends=(dep,))
def value():
    return dep.VALUE

print(value(), value.stats.cache_hits.get(value.signatures[0], 0))
"""


def test_kernel_cache_is_reused_and_follows_its_dependencies(tmp_path):
    """A second process loads the compiled function from disk; an edit in a file the function
    only inlines from (a `depends` module) makes the next process compile it anew."""
    (tmp_path / "mod.py").write_text(_CACHED_MODULE)
    (tmp_path / "dep.py").write_text("VALUE = 1\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": f"{tmp_path}:{root}", "PYTHONDONTWRITEBYTECODE": "1"}

    def run():
        done = subprocess.run([sys.executable, str(tmp_path / "mod.py")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        value, hits = done.stdout.split()
        return int(value), int(hits)

    assert run() == (1, 0)       # compiled and saved
    assert run() == (1, 1)       # loaded from the cache
    (tmp_path / "dep.py").write_text("VALUE = 22\n")
    assert run() == (22, 0)      # the dependency changed: compiled again, not the stale 1
    assert run() == (22, 1)
