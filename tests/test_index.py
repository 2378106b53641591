"""fastneg.data.index: one pre-flight scan per dataset, and the JPEG end-marker rule it applies.

The index is built once, reused while the folder is unchanged, rebuilt when a file is added,
removed, resized or touched, built once when several processes need it at the same time, and
kept in the user cache when the data folder is read-only.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastneg.data import index as data_index
from fastneg.data.files import inspect_file
from fastneg.data.imagefolder import scan_image_folder
from fastneg.data.index import INDEX_NAME, load_index


def _jpeg(seed: int, shape=(24, 32), **kw) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*shape, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def root(tmp_path) -> Path:
    """Two classes of three JPEGs (sizes 24x32 .. 26x34) and one file that is no image."""
    root = tmp_path / "data"
    for c, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"{k}.jpg").write_bytes(_jpeg(3 * c + k, (24 + k, 32 + k)))
    (root / "b" / "note.jpg").write_text("not an image")
    return root


def test_index_matches_the_check_and_is_reused(root):
    first = load_index(root, workers=1)
    assert first.path == root / INDEX_NAME and first.path.is_file()
    images = scan_image_folder(root)
    assert list(first.files) == list(images.files) and first.classes == ("a", "b")
    assert first.labels.tolist() == images.labels.tolist()
    check = first.file_check()
    assert [Path(f).name for f, _ in check.bad_files] == ["note.jpg"]
    assert check.heights[:3].tolist() == [24, 25, 26] and check.jpeg_rgb.sum() == 6
    assert first.sizes.tolist() == [os.path.getsize(images.path(i)) for i in range(len(images))]
    stamp = first.path.stat().st_mtime_ns
    again = load_index(root, workers=1)
    assert again.key == first.key and again.path.stat().st_mtime_ns == stamp   # not rewritten


@pytest.mark.parametrize("change", ["add", "remove", "touch", "resize"])
def test_a_changed_folder_invalidates_the_index(root, change):
    before = load_index(root, workers=1)
    target = root / "a" / "1.jpg"
    if change == "add":
        (root / "a" / "new.jpg").write_bytes(_jpeg(9))
    elif change == "remove":
        target.unlink()
    elif change == "touch":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    else:   # same mtime, different size: broken by an in-place edit the mtime hides
        st = target.stat()
        target.write_bytes(target.read_bytes()[:100])
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_index(root, workers=1)
    assert after.key != before.key
    names = list(after.files)
    assert ("a/new.jpg" in names) == (change == "add")
    assert ("a/1.jpg" in names) == (change != "remove")
    bad = {after.files[i] for i, _ in after.bad}
    assert ("a/1.jpg" in bad) == (change == "resize")   # rechecked, not taken from the old index


def test_a_damaged_index_file_is_rebuilt(root):
    load_index(root, workers=1)
    (root / INDEX_NAME).write_bytes(b"garbage")
    assert len(load_index(root, workers=1)) == 7


def test_read_only_data_folder_uses_the_user_cache(root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data_index.os, "access", lambda path, mode: False)
    built = load_index(root, workers=1)
    assert built.path.parent == tmp_path / "cache" / "fastneg" / "index"
    assert not (root / INDEX_NAME).exists()
    assert load_index(root, workers=1).path == built.path


def _first_use(root, barrier, log, queue):
    """One process of the concurrency test: count builds in `log`, report the key."""
    original = data_index.build_index

    def counted(*args, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(*args, **kw)

    data_index.build_index = counted
    barrier.wait()
    index = data_index.load_index(root, workers=1)
    queue.put((index.key, len(index), str(index.path)))


def test_concurrent_first_use_builds_once(root, tmp_path):
    n = 4
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    log = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_first_use, args=(root, barrier, log, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1                 # one process checked the files
    assert len(set(results)) == 1 and results[0][1] == 7     # every process read that index
    assert load_index(root, workers=1).key == results[0][0]


def test_index_verb(root, capsys):
    from fastneg.cli import main

    assert main(["index", str(root), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{root / INDEX_NAME}: 7 files, 2 classes, 1 unreadable" in out and "b/note.jpg" in out
    assert main(["index", str(root / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fastneg index: error: dataset folder {root / 'nope'} does not exist")
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    assert "fastneg/index" in capsys.readouterr().out


# ----------------------------------------------------------------- the JPEG end marker

def _with_thumbnail(main: bytes, thumb: bytes) -> bytes:
    """`main` with `thumb` (a whole JPEG, so with its own end marker) in an APP1 segment."""
    payload = b"Exif\x00\x00" + thumb
    return main[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + main[2:]


@pytest.mark.parametrize("name, make, problem", [
    ("plain", lambda: _jpeg(0), None),
    ("progressive", lambda: _jpeg(0, progressive=True), None),
    ("trailing bytes", lambda: _jpeg(0) + bytes(range(256)) * 400, None),
    ("a second picture after it", lambda: _jpeg(0) + _jpeg(1, (200, 300)), None),
    ("truncated", lambda: _jpeg(0)[:-300], "truncated JPEG"),
    ("truncated progressive", lambda: _jpeg(0, progressive=True)[:-300], "truncated JPEG"),
    ("truncated, thumbnail kept", lambda: _with_thumbnail(_jpeg(0), _jpeg(1, (8, 8)))[:-300],
     "truncated JPEG"),
    ("thumbnail, whole", lambda: _with_thumbnail(_jpeg(0), _jpeg(1, (8, 8))), None),
])
def test_jpeg_end_marker_rule(tmp_path, name, make, problem):
    path = tmp_path / "x.jpg"
    path.write_bytes(make())
    found, h, w, kind = inspect_file(path)
    if problem is None:
        assert (found, h, w) == (None, 24, 32), name
        Image.open(path).load()                   # and a decoder reads it
    else:
        assert found is not None and found.startswith(problem), (name, found)


def test_list_folder_lists_like_scan_image_folder(tmp_path):
    """Nested folders whose names sort differently as paths and as trees, hidden class folders,
    other extensions, upper-case extensions, a symlinked sub-folder."""
    root = tmp_path / "tree"
    names = ["c/a-b/1.jpg", "c/a/x/2.JPG", "c/a/3.png", "c/0.jpeg", "c/a.b/4.jpg",
             "c/.hidden/5.jpg", "d/z.jpg", "d/notes.txt", ".cache/6.jpg", "B/7.webp"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * len(name))
    (root / "d" / "link").symlink_to(root / "c" / "a")
    (root / "c" / "a" / "x" / "loop").symlink_to(root / "c" / "a")
    (root / "d" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"latin-1 name")
    images, sizes, mtimes = data_index.list_folder(root)
    expected = scan_image_folder(root)
    assert images.files == expected.files and images.classes == expected.classes
    assert images.ignored == expected.ignored == {".txt": 1}
    assert images.repeated_dirs == expected.repeated_dirs and images.repeated_dirs
    assert list(data_index.PathTable.from_strings(images.files)) == list(images.files)
    assert images.labels.tolist() == expected.labels.tolist()
    assert sizes.tolist() == [os.path.getsize(expected.path(i)) for i in range(len(expected))]
    assert mtimes.tolist() == [os.stat(expected.path(i)).st_mtime_ns
                               for i in range(len(expected))]
    (root / "d" / "z.jpg").unlink()
    (root / "d" / "link").unlink()
    (root / "d" / os.fsdecode(b"caf\xe9.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="without images"):
        data_index.list_folder(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_index.list_folder(root / "missing")


def test_nowhere_to_store_still_checks(root, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))     # the cache cannot be created
    monkeypatch.setattr(data_index.os, "access", lambda path, mode: False)
    with pytest.warns(UserWarning, match="checking every file"):
        index = load_index(root, workers=1)
    assert index.path is None and len(index.bad) == 1 and len(index) == 7
