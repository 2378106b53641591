"""The embedded shapes dataset: determinism, balance, the texture shortcut, bad input."""
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.synthetic import (SHAPES, SPLITS, TEXTURES, DatasetSpec, make_dataset,
                                    read_metadata)

SPEC = DatasetSpec(images_per_class=20, size=32, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d") / "shapes", SPEC, progress=False)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_different(shapes, tmp_path):
    again = make_dataset(tmp_path / "again", SPEC, progress=False, workers=1)
    assert _digest(again) == _digest(shapes)
    other = make_dataset(tmp_path / "other", DatasetSpec(images_per_class=20, size=32, seed=4),
                         progress=False)
    assert _digest(other) != _digest(shapes)


def test_splits_balanced_and_metadata_matches_files(shapes):
    for split in SPLITS:
        rows = read_metadata(shapes / split)
        listing = scan_image_folder(shapes / split)
        assert listing.classes == tuple(sorted(SHAPES))
        assert sorted(r["file"] for r in rows) == sorted(listing.files)
        counts = Counter(r["shape"] for r in rows)
        assert set(counts.values()) == {SPEC.count(split)}, counts
        by_file = dict(zip(listing.files, listing.labels.tolist()))
        for r in rows:   # label column = the shape; folder = the shape
            assert SHAPES[r["label"]] == r["shape"] == r["file"].split("/")[0]
            assert listing.classes[by_file[r["file"]]] == r["shape"]


def test_texture_shortcut_and_conflict_rules(shapes):
    train = read_metadata(shapes / "train")
    dominant = np.mean([r["texture_class"] == r["label"] for r in train])
    n = len(train)
    se = np.sqrt(0.8 * 0.2 / n)
    assert abs(dominant - 0.8) < 4 * se, dominant
    for r in read_metadata(shapes / "conflict"):
        assert r["texture_class"] != r["label"]
        assert r["texture"] == TEXTURES[r["texture_class"]]
    assert all(r["texture"] == "none" for r in read_metadata(shapes / "outline"))


def test_p_dominant_statistics_large_sample(tmp_path):
    # The correlation holds at another p too (draws only: rendering is not needed for this).
    from fastneg.data.synthetic import draw_texture_family, image_rng
    p = 0.6
    hits = [draw_texture_family("train", i % 10, image_rng(0, "train", i), p) == i % 10
            for i in range(4000)]
    assert abs(np.mean(hits) - p) < 3 * np.sqrt(p * (1 - p) / 4000)


def test_images_decode_with_pil_and_torchvision(shapes):
    files = sorted((shapes / "val").rglob("*.jpg"))[:20]
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
        x = torchvision.io.decode_jpeg(torchvision.io.read_file(str(f)))
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
        assert x.float().std() > 5   # not a blank image


def test_imagenet_like_size(tmp_path):
    out = make_dataset(tmp_path / "big", DatasetSpec(images_per_class=1, imagenet_like=True),
                       progress=False)
    with Image.open(next((out / "train").rglob("*.jpg"))) as im:
        assert im.size == (500, 375)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastneg.cli", *args], capture_output=True,
                          text=True)


def test_non_empty_dir_without_force_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _cli("make-data", "--out", str(out), "--images-per-class", "1", "--size", "16")
    assert r.returncode == 2
    assert "not empty" in r.stderr and "--force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    r = _cli("make-data", "--out", str(out), "--images-per-class", "1", "--size", "16", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "train" / "metadata.csv").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; checked as a user only")
def test_unwritable_parent_is_refused_as_user(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = _cli("make-data", "--out", str(ro / "x"), "--images-per-class", "1")
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_output_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _cli("make-data", "--out", str(f), "--images-per-class", "1")
    assert r.returncode == 2 and "not a directory" in r.stderr
    assert f.read_text() == "x"


def test_write_failure_leaves_no_partial_dataset(tmp_path):
    # An output under a path component that is a file cannot be created: clear error, no debris.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    r = _cli("make-data", "--out", str(blocker / "sub" / "data"), "--images-per-class", "1")
    assert r.returncode == 2 and "error" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def chi_squared_independence(a, b) -> tuple[float, int]:
    """Pearson's chi-squared statistic of the contingency table of two label arrays, and its
    degrees of freedom."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ua), len(ub)))
    np.add.at(table, (ia, ib), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), (len(ua) - 1) * (len(ub) - 1)


# Upper 0.1% points of the chi-squared distribution (scipy.stats.chi2.isf(0.001, df)).
CHI2_CRITICAL_0001 = {3: 16.27, 9: 27.88, 27: 55.48, 81: 126.08}


def test_chi_squared_detects_dependence():
    rng = np.random.default_rng(0)
    a = rng.integers(10, size=3000)
    dependent = np.where(rng.random(3000) < 0.3, a, rng.integers(10, size=3000))
    assert chi_squared_independence(a, dependent)[0] > CHI2_CRITICAL_0001[81]


def test_independent_factors_are_independent_and_uniform(tmp_path):
    root = make_dataset(tmp_path / "ind", DatasetSpec(images_per_class=80, size=24, seed=5,
                                                      colour="palette", independent=True),
                        progress=False)
    rows = read_metadata(root / "train")
    shape = [r["label"] for r in rows]
    texture = [r["texture_class"] for r in rows]
    colour = [r["colour"] for r in rows]
    assert set(colour) == {"red", "green", "blue", "yellow"}
    for a, b in ((shape, texture), (shape, colour), (texture, colour)):
        stat, df = chi_squared_independence(a, b)
        assert stat < CHI2_CRITICAL_0001[df], (stat, df)
    for factor, k in ((texture, 10), (colour, 4)):   # uniform: goodness of fit
        counts = np.bincount(np.unique(factor, return_inverse=True)[1])
        expected = len(factor) / k
        stat = float(((counts - expected) ** 2 / expected).sum())
        assert len(counts) == k and stat < CHI2_CRITICAL_0001[k - 1], counts
    # The default design keeps the shortcut: texture follows the shape.
    dep = make_dataset(tmp_path / "dep", DatasetSpec(images_per_class=30, size=24, seed=5),
                       progress=False)
    rows = read_metadata(dep / "train")
    stat, df = chi_squared_independence([r["label"] for r in rows],
                                        [r["texture_class"] for r in rows])
    assert stat > CHI2_CRITICAL_0001[df]


def test_grey_default_has_no_colour_and_few_levels(shapes):
    img = np.asarray(Image.open(sorted((shapes / "train").rglob("*.jpg"))[0]), np.int16)
    spread = np.abs(img - img.mean(2, keepdims=True)).max()
    assert spread < 25, spread   # grey up to JPEG chroma error and sensor noise
    assert {r["colour"] for r in read_metadata(shapes / "train")} == {"grey"}


def test_unknown_colour_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="colour mode"):
        make_dataset(tmp_path / "x", DatasetSpec(images_per_class=1, size=16, colour="pink"),
                     progress=False)
    assert not (tmp_path / "x").exists()


def test_path_table_gives_the_listings_paths_in_less_memory(tmp_path):
    import pickle

    from fastneg.data.imagefolder import PathTable
    names = ["a/plain.jpg", "a/with space.jpg", "b/ünï çødé.jpg", "b/x" * 40 + ".jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="JPEG")
    listing = scan_image_folder(tmp_path)
    table = PathTable.of(listing)
    expected = [str(listing.path(i)) for i in range(len(listing))]
    assert len(table) == len(expected) == 4
    assert [table[i] for i in range(len(table))] == expected
    assert table[np.int64(2)] == expected[2]
    for bad in (-1, 4):
        with pytest.raises(IndexError, match="out of range"):
            table[bad]
    copy = pickle.loads(pickle.dumps(table))
    assert [copy[i] for i in range(4)] == expected
    many = PathTable("/data/imagenet/train", [f"n{i:08d}/n{i:08d}_{i}.JPEG" for i in range(20000)])
    as_list = [many[i] for i in range(len(many))]
    list_bytes = sys.getsizeof(as_list) + sum(sys.getsizeof(p) for p in as_list)
    table_bytes = sys.getsizeof(many._blob) + many._offsets.nbytes
    assert table_bytes < list_bytes / 2, (table_bytes, list_bytes)
