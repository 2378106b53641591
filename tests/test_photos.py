"""fastneg.data.photos: the benchmark's real-photo ImageFolder (`fastneg make-data --photos`)."""
import subprocess
import sys

import pytest
from PIL import Image

from fastneg.data import photos


def test_photos_are_imagenet_sized_jpegs_made_deterministically(tmp_path):
    pytest.importorskip("skimage", reason="the photos come from scikit-image (fastneg[eval])")
    a = photos.make_photos(tmp_path / "a", images_per_class=2, seed=3)
    b = photos.make_photos(tmp_path / "b", images_per_class=2, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 2 * len(photos.PHOTOS)
    assert {f.parts[0] for f in files} == set(photos.PHOTOS)        # one class per photo
    sizes = {(w, h) for w, h, _ in photos.SIZES}
    for f in files:
        with Image.open(a / f) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size in sizes
        assert (a / f).read_bytes() == (b / f).read_bytes()
    c = photos.make_photos(tmp_path / "c", images_per_class=2, seed=4)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_photos_cli_errors_are_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for args in (["--out", str(tmp_path / "new"), "--images-per-class", "0"],
                 ["--out", str(tmp_path / "full")]):
        done = subprocess.run([sys.executable, "-m", "fastneg.cli", "make-data", "--photos", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("fastneg make-data: error:") and "Traceback" not in done.stderr
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert not (tmp_path / "new").exists()


def test_make_photos_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="images_per_class"):
        photos.make_photos(tmp_path / "x", images_per_class=-1)
    with pytest.raises(ValueError, match="seed"):
        photos.make_photos(tmp_path / "x", seed=-1)
