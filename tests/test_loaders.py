"""fastneg.loaders: the Loader contract on every backend (DALI and FFCV on the CPU here).

One small dataset for everything: the shapes train split (40 images of 32 px, 10 classes) plus a
class `zgrid` of 64 px "coordinate" images (red = 4 x column, green = 4 x row), from which the
crop window of a view can be read back. FFCV datasets are converted once, in child processes;
loaders are cached per configuration because each FFCV Loader compiles for a few seconds.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2.functional import resized_crop

import fastneg.loaders as loaders
from fastneg.data import convert
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import DatasetSpec, make_dataset
from fastneg.loaders import KINDS, Batch, available_kinds, build_loader
from fastneg.loaders.common import center_box

SIZE, BS, GRID = 32, 8, 64
PREFLIGHT_BAD = ("corrupt.jpg", "empty.jpg", "gif.jpg", "text.jpg", "truncated.jpg")
UNUSUAL_OK = ("gray.jpg", "cmyk.jpg", "png.jpg", "tiny.jpg")   # valid: decoded like PIL

pytestmark = pytest.mark.slow   # FFCV conversions and per-Loader compilation: about a minute
per_kind = pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.skipif(k not in available_kinds(), reason=f"{k} missing"))
    for k in KINDS])


def _coordinate_image(k: int) -> np.ndarray:
    y, x = np.mgrid[0:GRID, 0:GRID]
    return np.stack([4 * x, 4 * y, np.full_like(x, 8 * k)], -1).astype(np.uint8)


def _write_bad_root(root: Path) -> Path:
    """Class a: good, grayscale and CMYK JPEGs. Class b: PNG content in a .jpg, an image smaller
    than SIZE, the pre-flight failures, and a JPEG with a bogus Huffman table that only a
    decoder notices."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rgb = np.asarray(Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8)).resize((64, 48)))
    for k in range(4):
        Image.fromarray(np.roll(rgb, 8 * k, 1)).save(root / f"a/good{k}.jpg", quality=90)
    Image.fromarray(rgb).convert("L").save(root / "a/gray.jpg", quality=90)
    Image.fromarray(rgb).convert("CMYK").save(root / "a/cmyk.jpg", quality=90)
    Image.fromarray(rgb).save(root / "b/png.jpg", format="PNG")
    Image.fromarray(rgb[:5, :7]).save(root / "b/tiny.jpg", quality=90)
    Image.fromarray(rgb).save(root / "b/gif.jpg", format="GIF")
    good = (root / "a/good0.jpg").read_bytes()
    (root / "b/truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / "b/corrupt.jpg").write_bytes(good[:2] + bytes(range(198)) + good[200:])
    dht = good.find(b"\xff\xc4")
    (root / "b/huffman.jpg").write_bytes(good[:dht + 5] + b"\xff" * 16 + good[dht + 21:])
    (root / "b/text.jpg").write_text("not an image")
    (root / "b/empty.jpg").write_bytes(b"")
    return root


def _convert(src, out, **kw):
    """convert_to_beton, returning the error instead of raising (conversions run in threads)."""
    try:
        return convert.convert_to_beton(src, out, progress=False, workers=1, **kw)
    except ValueError as e:
        return e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    make_dataset(root / "shapes", DatasetSpec(images_per_class=4, size=32), progress=False)
    train = root / "shapes" / "train"
    (train / "zgrid").mkdir()
    for k in range(24):
        Image.fromarray(_coordinate_image(k)).save(train / f"zgrid/{k:02d}.jpg", quality=95)
    bad = _write_bad_root(root / "bad")
    decode_only = root / "decode_only"   # passes the pre-flight check, fails to decode
    shutil.copytree(bad, decode_only, ignore=shutil.ignore_patterns(*PREFLIGHT_BAD))
    betons = {}
    if "ffcv" in available_kinds():
        jobs = {"train": (train, root / "train.beton", {}),
                "bad": (bad, root / "bad.beton", {"skip_bad": True}),
                "decode_only": (decode_only, root / "decode_only.beton", {})}
        with ThreadPoolExecutor(2) as pool:   # child processes; two cores
            futures = {k: pool.submit(_convert, src, out, **kw)
                       for k, (src, out, kw) in jobs.items()}
        betons = {k: f.result() for k, f in futures.items()}
    return SimpleNamespace(root=root, train=train, bad=bad, decode_only=decode_only, betons=betons,
                           images=scan_image_folder(train))


_LOADERS: dict = {}


def _source(data, kind, which="train"):
    if kind != "ffcv":
        return getattr(data, which)
    beton = data.betons[which]
    assert isinstance(beton, Path), f"conversion of {which} failed: {beton}"
    return beton


def get_loader(data, kind, which="train", **kw):
    """A cached loader: same data and arguments, same object (FFCV compiles per Loader).

    FFCV sets torch's thread count to its `workers`: its loaders keep the default (all cores)
    so that the rest of the test session is not slowed down.
    """
    workers = None if kind == "ffcv" else 1
    args = dict(batch_size=BS, size=SIZE, device="cpu", workers=workers, drop_last=False) | kw
    key = (kind, which, tuple(sorted(args.items())))
    if key not in _LOADERS:
        _LOADERS[key] = build_loader(kind, _source(data, kind, which), **args)
    return _LOADERS[key]


def run_epoch(loader, epoch=0) -> list[Batch]:
    loader.set_epoch(epoch)
    return list(loader)


def indices_of(batches) -> list[int]:
    return [i for b in batches for i in b.indices.tolist()]


def views_by_index(batches) -> dict[int, list[torch.Tensor]]:
    return {i: [v[k] for v in b.views] for b in batches for k, i in enumerate(b.indices.tolist())}


# ----------------------------------------------------------------- the contract

@per_kind
def test_batches_shapes_labels_and_each_index_once(data, kind):
    loader = get_loader(data, kind)
    batches = run_epoch(loader)
    assert len(batches) == len(loader) == math.ceil(len(data.images) / BS)
    for b in batches[:-1]:
        assert len(b.indices) == BS
    for b in batches:
        assert isinstance(b, Batch) and len(b.views) == 2
        for v in b.views:
            assert v.shape == (len(b.indices), SIZE, SIZE, 3)
            assert v.dtype == torch.uint8 and v.device.type == "cpu" and v.is_contiguous()
        assert b.labels.dtype == b.indices.dtype == torch.int64
        for i, y in zip(b.indices.tolist(), b.labels.tolist()):
            assert y == data.images.labels[i]
            assert loader.classes[y] == Path(data.images.files[i]).parts[0]
    assert sorted(indices_of(batches)) == list(range(len(data.images)))
    assert loader.skipped == 0


@per_kind
def test_two_ranks_cover_the_dataset_without_overlap(data, kind):
    parts = [indices_of(run_epoch(get_loader(data, kind, rank=r, world_size=2), epoch=3))
             for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(len(data.images)))
    full = [get_loader(data, kind, rank=r, world_size=2, drop_last=True) for r in range(2)]
    if kind != "ffcv":   # FFCV compiles per Loader: the drop_last shapes are checked on two
        batches = [run_epoch(loader) for loader in full]
        assert len(batches[0]) == len(batches[1]) == len(full[0]) > 0
        assert all(len(b.indices) == BS for part in batches for b in part)


@per_kind
def test_epochs_differ_and_the_same_seed_repeats(data, kind):
    loader = get_loader(data, kind, workers=2 if kind == "torch" else None)
    e0, e1 = run_epoch(loader, 0), run_epoch(loader, 1)
    assert indices_of(e0) != indices_of(e1)
    v0, v1 = views_by_index(e0), views_by_index(e1)
    grid = [i for i, f in enumerate(data.images.files) if f.startswith("zgrid")]
    assert all(not torch.equal(v0[i][0], v1[i][0]) for i in grid)    # new crops each epoch
    assert all(not torch.equal(v0[i][0], v0[i][1]) for i in grid)    # two different views
    again = build_loader(kind, _source(data, kind), batch_size=BS, size=SIZE, device="cpu",
                         drop_last=False, seed=0)
    repeat = run_epoch(again, 0)
    assert indices_of(repeat) == indices_of(e0)
    for a, b in zip(repeat, e0):
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    assert indices_of(run_epoch(get_loader(data, kind, seed=7))) != indices_of(e0)


def _estimated_boxes(batches, grid_indices) -> np.ndarray:
    """(height, width) of each view's crop window, read from the coordinate images.

    In a view's interior the red channel grows by 4 * width / SIZE per column (green likewise per
    row) whatever the filter; edge columns are left out (filters treat borders differently).
    """
    cols = np.arange(SIZE // 4, 3 * SIZE // 4)
    sizes = []
    for b in batches:
        for k, i in enumerate(b.indices.tolist()):
            if i not in grid_indices:
                continue
            for v in b.views:
                px = v[k].numpy().astype(np.float64)
                slope_x = np.polyfit(cols, px[:, cols, 0].mean(0), 1)[0]
                slope_y = np.polyfit(cols, px[cols, :, 1].mean(1), 1)[0]
                sizes.append((slope_y * SIZE / 4, slope_x * SIZE / 4))
    return np.array(sizes)


@per_kind
def test_crops_follow_random_resized_crop(data, kind):
    loader = get_loader(data, kind)
    grid = {i for i, f in enumerate(data.images.files) if f.startswith("zgrid")}
    hw = np.concatenate([_estimated_boxes(run_epoch(loader, e), grid) for e in range(3)])
    assert len(hw) == 3 * 2 * len(grid)
    torch.manual_seed(0)
    image = torch.zeros(3, GRID, GRID)
    ref = np.array([RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])[2:]
                    for _ in range(4000)], np.float64)
    area, ref_area = hw.prod(1) / GRID ** 2, ref.prod(1) / GRID ** 2
    log_ratio, ref_log_ratio = np.log(hw[:, 1] / hw[:, 0]), np.log(ref[:, 1] / ref[:, 0])
    assert ks_2samp(area, ref_area).pvalue > 1e-3
    assert ks_2samp(log_ratio, ref_log_ratio).pvalue > 1e-3
    # and not any distribution: a fixed-scale sampler is far from it
    assert ks_2samp(np.full_like(area, 0.6), ref_area).pvalue < 1e-3


def test_backends_agree_on_order_and_crops(data):
    kinds = [k for k in KINDS if k in available_kinds()]
    epochs = {k: run_epoch(get_loader(data, k), 2) for k in kinds}
    for k in kinds:
        assert indices_of(epochs[k]) == indices_of(epochs["torch"])
    # DALI and torch decode the same files: only the resampling filter differs. FFCV stores
    # re-encoded JPEGs and resizes with INTER_AREA: further apart, still the same windows.
    tolerance = {"torch": 0, "dali": 2.0, "ffcv": 8.0}
    for k in kinds:
        for a, b in zip(epochs[k], epochs["torch"]):
            for x, y in zip(a.views, b.views):
                assert (x.float() - y.float()).abs().mean() <= tolerance[k], k


@per_kind
def test_eval_crop_is_resize_then_centre_crop(data, kind):
    loader = get_loader(data, kind, views=1, scale=None, shuffle=False)
    batches = run_epoch(loader)
    assert indices_of(batches) == list(range(len(data.images)))
    grid = {i for i, f in enumerate(data.images.files) if f.startswith("zgrid")}
    top, left, side, _ = center_box(GRID, GRID, SIZE)
    assert side == round(GRID * SIZE / int(SIZE / 0.875))
    for b in batches:
        for k, i in enumerate(b.indices.tolist()):
            if i in grid:
                px = b.views[0][k].numpy().astype(np.float64)
                # the centre pixel sees the image centre; the window's side as in the estimate
                assert abs(px[SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1, 0].mean()
                           / 4 - (GRID - 1) / 2) < 1.0
                est = _estimated_boxes([Batch((b.views[0][k:k + 1],), b.labels[k:k + 1],
                                              b.indices[k:k + 1])], {i})[0]
                assert np.allclose(est, side, atol=1.5)


# ----------------------------------------------------------------- bad input

def _pil_reference(path, size) -> torch.Tensor:
    """The evaluation crop of `path` as PIL decodes it (RGB conversion included)."""
    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    top, left, h, w = center_box(rgb.shape[1], rgb.shape[2], size)
    return resized_crop(rgb, top, left, h, w, [size, size], antialias=True).permute(1, 2, 0)


@per_kind
def test_unreadable_files_stop_the_build_naming_them(data, kind, tmp_path):
    with pytest.raises(ValueError) as err:
        if kind == "ffcv":   # the check runs before FFCV's writer starts: safe in this process
            convert.write_beton(data.bad, tmp_path / "bad.beton")
        else:
            build_loader(kind, data.bad, batch_size=2, size=SIZE, device="cpu")
    for name in PREFLIGHT_BAD:
        assert name in str(err.value)
    assert "skip_bad" in str(err.value)
    assert not (tmp_path / "bad.beton").exists()


@per_kind
def test_skip_bad_leaves_them_out_counts_and_reports(data, kind, caplog):
    loader = get_loader(data, kind, "bad", batch_size=4, views=1, scale=None, shuffle=False,
                        skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="fastneg.loaders"):
        batches = run_epoch(loader)
    images = scan_image_folder(data.bad)
    names = [Path(f).name for f in images.files]
    got = indices_of(batches)
    # a file that fails only when decoded is replaced by another of the shard: full batches
    assert all(len(b.indices) == 4 for b in batches[:-1])
    assert sorted({names[i] for i in got}) == sorted(UNUSUAL_OK + tuple(f"good{k}.jpg"
                                                                        for k in range(4)))
    assert [images.labels[i] for i in got] == [y for b in batches for y in b.labels.tolist()]
    assert loader.skipped == len(PREFLIGHT_BAD) + 1
    assert {Path(f).name for f, _ in loader.bad_files} == {*PREFLIGHT_BAD, "huffman.jpg"}
    assert f"skipped {loader.skipped} unreadable" in caplog.text
    # grayscale, CMYK, PNG content and a 5x7 image: decoded as PIL decodes them
    tolerance = {"torch": 1.0, "dali": 2.0, "ffcv": 8.0}[kind]
    for b in batches:
        for k, i in enumerate(b.indices.tolist()):
            ref = _pil_reference(images.path(i), SIZE).float()
            assert (b.views[0][k].float() - ref).abs().mean() <= tolerance, names[i]


@per_kind
def test_decode_failure_after_the_check_names_the_file(data, kind):
    if kind == "ffcv":   # FFCV decodes everything at conversion, which stops there
        error = data.betons["decode_only"]
        assert isinstance(error, ValueError) and "huffman.jpg" in str(error)
        return
    loader = build_loader(kind, data.decode_only, batch_size=4, size=SIZE, device="cpu",
                          workers=1, drop_last=False)
    with pytest.raises(RuntimeError, match="huffman.jpg"):
        run_epoch(loader)


@per_kind
def test_missing_or_empty_dataset(data, kind, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copytree(data.bad / "a", tmp_path / "empty_class/a")
    (tmp_path / "empty_class/b").mkdir()
    for root, message in [(tmp_path / "missing", "does not exist"),
                          (tmp_path / "empty", "no class sub-folders"),
                          (tmp_path / "empty_class", "without images in .*: b")]:
        with pytest.raises(FileNotFoundError, match=message):
            if kind == "ffcv":
                convert.write_beton(root, tmp_path / "x.beton")
            else:
                build_loader(kind, root, batch_size=2, size=SIZE, device="cpu")
    if kind == "ffcv":
        with pytest.raises(FileNotFoundError, match="missing.beton"):
            build_loader(kind, tmp_path / "missing.beton", batch_size=2, device="cpu")


@pytest.mark.skipif("ffcv" not in available_kinds(), reason="ffcv missing")
def test_beton_from_another_version_or_layout(data, tmp_path):
    def copy(name) -> Path:
        out = tmp_path / name
        shutil.copy(data.betons["train"], out)
        shutil.copy(convert.sidecar_path(data.betons["train"]), convert.sidecar_path(out))
        return out

    def edit_sidecar(path, **change):
        info = json.loads(convert.sidecar_path(path).read_text()) | change
        convert.sidecar_path(path).write_text(json.dumps(info))

    old_ffcv = copy("old_ffcv.beton")
    raw = bytearray(old_ffcv.read_bytes())
    raw[0:2] = (1).to_bytes(2, "little")              # FFCV's header: format version first
    old_ffcv.write_bytes(bytes(raw))
    no_sidecar = copy("no_sidecar.beton")
    convert.sidecar_path(no_sidecar).unlink()
    old_layout = copy("old_layout.beton")
    edit_sidecar(old_layout, version=0)
    stale = copy("stale.beton")
    edit_sidecar(stale, samples=3)
    tiny = tmp_path / "tiny.beton"
    tiny.write_bytes(b"beton")
    for path, message in [(old_ffcv, "FFCV format version 1"), (no_sidecar, "missing"),
                          (old_layout, "version 0"), (stale, "does not match"),
                          (tiny, "not a .beton")]:
        with pytest.raises(ValueError, match=message):
            build_loader("ffcv", path, batch_size=BS, size=SIZE, device="cpu")


# ----------------------------------------------------------------- arguments and set-up

def test_bad_arguments_are_named(data):
    with pytest.raises(ValueError, match="unknown loader kind 'pil'"):
        build_loader("pil", data.train, batch_size=2, device="cpu")
    for change, message in [({"batch_size": 0}, "batch_size"),
                            ({"rank": 2, "world_size": 2}, "rank"),
                            ({"scale": None}, "views=1"),
                            ({"scale": (0.5, 0.2)}, "scale"),
                            ({"ratio": (2.0, 1.0)}, "ratio"),
                            ({"workers": -1}, "workers"),
                            ({"device": "tpu"}, "device"),
                            ({"batch_size": 1000}, "no full batch of 1000")]:
        with pytest.raises(ValueError, match=message):
            build_loader("torch", data.train, **({"batch_size": 2, "device": "cpu"} | change))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            build_loader("torch", data.train, batch_size=2, device="cuda")


def test_unavailable_backend_says_what_to_install(data, monkeypatch):
    monkeypatch.setitem(loaders._BACKENDS, "dali",
                        ("fastneg.loaders.dali", "fastneg_no_such_package", "dali"))
    with pytest.raises(ImportError, match=r"pip install 'fastneg\[dali\]'"):
        build_loader("dali", data.train, batch_size=2, device="cpu")


def test_torch_backend_decodes_each_image_once(data, monkeypatch):
    from fastneg.loaders import torch_loader

    calls = []
    decode = torch_loader._decode_cpu
    monkeypatch.setattr(torch_loader, "_decode_cpu", lambda p: calls.append(p) or decode(p))
    batches = run_epoch(build_loader("torch", data.train, batch_size=BS, size=SIZE,
                                     device="cpu", workers=0, drop_last=False, views=3))
    assert len(calls) == len(set(calls)) == len(indices_of(batches)) == len(data.images)
    assert all(len(b.views) == 3 for b in batches)


def test_damaged_png_is_a_decode_error_not_a_crash(tmp_path):
    """A PNG whose header and IEND are intact but whose image data is broken passes the
    pre-flight check; torchvision's PNG decoder can crash the process on it (SIGSEGV), so the
    torch loader decodes PNGs with PIL and reports a RuntimeError (in a child process, so that
    a crash fails this test instead of killing pytest)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    path = tmp_path / "broken.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 40:start + 400] = bytes(360)         # zeros in the middle of the zlib stream
    path.write_bytes(bytes(data))
    code = ("import sys, torch\n"
            "from fastneg.loaders.torch_loader import _decode_cpu\n"
            "raw = torch.frombuffer(bytearray(open(sys.argv[1], 'rb').read()), dtype=torch.uint8)\n"
            "try:\n    _decode_cpu(raw)\nexcept RuntimeError as e:\n    print('decode error:', e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "decode error: PNG" in done.stdout, done.stdout


EXIT_PROBE = """
import os, sys
from fastneg.loaders import build_loader
loader = build_loader("dali", sys.argv[1], batch_size=4, size=32, device="cpu", workers=1)
it = iter(loader)
next(it)
os._kept_until_the_end = (loader, it)    # outlives nvidia.dali's modules at shutdown
"""


def test_dali_pipelines_end_before_the_interpreter_does(data):
    """A DALI loader (and a suspended epoch) still referenced at exit: no "Exception ignored in
    Pipeline.__del__" from DALI's modules being torn down first."""
    if "dali" not in loaders.available_kinds():
        pytest.skip("DALI is not installed")
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE, str(data.train)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
