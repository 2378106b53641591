"""The dataset index: one pre-flight scan per dataset, read by every rank and every run.

Listing an ImageFolder and checking every file (fastneg.data.files.check_files: header and end
of each file) costs one open per file; at ImageNet scale, on 8 ranks per node, at every start,
that is millions of opens before step 0. The index does it once and stores the result:

- what it holds: the listing (paths relative to the root, labels, class names), each file's
  size and mtime, the image sizes and content kind from the check, and the unreadable files
  with their reasons; paths are stored once, as one bytes blob plus offsets.
- where: `ROOT/.fastneg-index` next to the data or, when ROOT is not writable,
  `$XDG_CACHE_HOME/fastneg/index/<hash of ROOT's path>` (default ~/.cache). Written to a
  temporary sibling and renamed into place, so a reader sees a whole index or none.
- when it is stale: it is keyed by the folder's state, a hash of the listing, the labels and
  every file's size and mtime (one stat per file, no open). A file added, removed, resized or
  touched gives another key and the index is rebuilt.
- who builds it: `fastneg index DATA`, or the first process that needs it (the loaders call
  `load_index`); it holds an exclusive file lock (flock) next to the index while building, so
  the other ranks of a node, or any other process, wait and then read the index it wrote.
  Concurrent first use builds it once.
- memory: the file is memory-mapped, so the ranks of a node share its pages (page cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fastneg.data.files as file_rules
from fastneg.data.files import FileCheck, available_cpus, check_files
from fastneg.data.imagefolder import IMG_EXTENSIONS, ImageList, scan_image_folder
from fastneg.fs import atomic_file, wait_lock

log = logging.getLogger("fastneg.data")

INDEX_NAME = ".fastneg-index"
LOCK_SUFFIX = ".lock"
MAGIC = b"FNIDX\x00\x01\x00"
# Bump when the file check's rules change (v1: a JPEG may have bytes after its end marker), so
# that indices written under the old rules are rebuilt.
CHECK_VERSION = 1
CHUNK = 4096                      # files per check_files call while building (progress steps)
ALIGN = 64
KIND_BAD, KIND_JPEG_RGB, KIND_OTHER = 0, 1, 2
KIND_NAMES = ("unreadable", "JPEG (L or RGB: nvJPEG decodes it)", "other readable image")


class PathTable(Sequence):
    """Relative paths stored once as UTF-8 bytes plus offsets; item i is decoded on access."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, names: Sequence[str]) -> "PathTable":
        encoded = [os.fsencode(n) for n in names]   # non-UTF-8 names keep their bytes
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        return os.fsdecode(self.blob[a:b].tobytes())


@dataclass(frozen=True)
class DatasetIndex:
    """A checked listing of an ImageFolder (see the module docstring)."""
    root: Path
    key: str                      # the folder state it describes (folder_state)
    files: PathTable              # relative paths, ImageFolder order
    labels: np.ndarray            # int64 [N]
    classes: tuple[str, ...]
    sizes: np.ndarray             # int64 [N] bytes
    mtimes: np.ndarray            # int64 [N] ns
    heights: np.ndarray           # int64 [N], 0 for an unreadable file
    widths: np.ndarray            # int64 [N]
    kinds: np.ndarray             # uint8 [N]: KIND_BAD / KIND_JPEG_RGB / KIND_OTHER
    bad: tuple[tuple[int, str], ...]   # (dataset index, reason)
    path: Path | None = None      # the index file it was read from or written to

    def __len__(self) -> int:
        return len(self.files)

    def file_check(self) -> FileCheck:
        """The same FileCheck that check_files gives for this folder, without opening a file."""
        # Labels copied: the mapped file is read-only, and torch.from_numpy wants writable arrays.
        images = ImageList(self.root, self.files, np.array(self.labels), self.classes)
        return FileCheck(images, self.heights, self.widths, self.kinds == KIND_JPEG_RGB, self.bad)


# ----------------------------------------------------------------- folder state

def stat_files(images: ImageList) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, mtimes in ns) of every file of a listing: one stat each, no open; -1 for a file
    that cannot be stat'ed (the check then reports it)."""
    root = str(images.root)
    n = len(images)
    sizes, mtimes = np.empty(n, np.int64), np.empty(n, np.int64)
    for i, name in enumerate(images.files):
        try:
            st = os.stat(os.path.join(root, name))
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
        except OSError:
            sizes[i] = mtimes[i] = -1
    return sizes, mtimes


def list_folder(root) -> tuple[ImageList, np.ndarray, np.ndarray]:
    """scan_image_folder's listing (same files, same order) with each file's size and mtime.

    One os.scandir pass that takes the stat from each directory entry: several times faster than
    scan_image_folder + stat_files in Python, which matters at a million files on every rank.
    The order rule is scan_image_folder's: classes sorted; within a class, directories in the
    sorted order of their paths, files sorted by name. A folder that is not a valid ImageFolder
    is handed to scan_image_folder for its error.
    """
    root = Path(root)
    base = str(root)
    try:
        classes = sorted(e.name for e in os.scandir(base)
                         if e.is_dir() and not e.name.startswith("."))
    except OSError:
        classes = []
    files, labels, sizes, mtimes = [], [], [], []
    ignored: dict[str, int] = {}
    repeated: list[str] = []
    for label, cls in enumerate(classes):
        # Depth first in name order, entering no folder twice (device, inode), as
        # scan_image_folder does, so that the same path of a repeated folder counts.
        dirs, seen, todo = [], set(), [cls]
        while todo:
            rel = todo.pop()
            try:
                st = os.stat(os.path.join(base, rel))
                if (st.st_dev, st.st_ino) in seen:
                    repeated.append(rel)
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(os.path.join(base, rel)) as it:
                    entries = list(it)
            except OSError:
                continue
            names, subdirs = [], []
            for e in entries:
                if e.is_dir():
                    subdirs.append(e.name)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(e)
                elif not e.name.startswith("."):
                    ext = os.path.splitext(e.name)[1].lower() or "(no extension)"
                    ignored[ext] = ignored.get(ext, 0) + 1
            todo += [f"{rel}/{d}" for d in sorted(subdirs, reverse=True)]
            dirs.append((rel, names))
        count = 0
        for rel, names in sorted(dirs, key=lambda d: d[0]):
            for e in sorted(names, key=lambda e: e.name):
                try:
                    st = e.stat()
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size = mtime = -1
                files.append(f"{rel}/{e.name}")
                sizes.append(size)
                mtimes.append(mtime)
                count += 1
        if count == 0:
            classes = []                           # let scan_image_folder say what is wrong
            break
        labels.append(np.full(count, label, np.int64))
    if not classes:
        scan_image_folder(root)                    # raises its error for this folder
        raise FileNotFoundError(f"dataset folder {root} cannot be listed")
    images = ImageList(root, tuple(files), np.concatenate(labels), tuple(classes), ignored,
                       tuple(repeated))
    if ignored or repeated:
        log.warning("%s: %s", root, images.report())
    return images, np.asarray(sizes, np.int64), np.asarray(mtimes, np.int64)


def folder_state(images: ImageList, sizes: np.ndarray, mtimes: np.ndarray) -> str:
    """sha256 of the listing, labels, sizes and mtimes (and the check rules: their version and
    the pixel limit, which FASTNEG_MAX_PIXELS may change)."""
    h = hashlib.sha256(f"fastneg-index {CHECK_VERSION} {file_rules.MAX_PIXELS} "
                       f"{len(images)}\n".encode())
    h.update(os.fsencode("\0".join(images.classes)) + b"\1")
    h.update(os.fsencode("\0".join(images.files)) + b"\1")
    for a in (images.labels, sizes, mtimes):
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------- where it lives

def cache_dir() -> Path:
    """$XDG_CACHE_HOME/fastneg/index (default ~/.cache/fastneg/index)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastneg" / "index"


def index_locations(root) -> list[Path]:
    """Where the index of `root` may be: next to the data first, then the user cache."""
    resolved = Path(os.path.realpath(root))
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:24]
    return [resolved / INDEX_NAME, cache_dir() / f"{resolved.name}-{tag}"]


def _writable_location(root) -> Path:
    """Where to write the index of `root`: next to the data if ROOT is writable, else the user
    cache (created if needed)."""
    here, cache = index_locations(root)
    if os.access(here.parent, os.W_OK):
        return here
    cache.parent.mkdir(parents=True, exist_ok=True)
    return cache


# ----------------------------------------------------------------- file format

def write_index(path: Path, index: DatasetIndex) -> None:
    """Write `index` to `path` atomically (fastneg.fs.atomic_file).

    Layout: MAGIC, header length (8 bytes little-endian), a JSON header (metadata and, per array,
    dtype, shape and offset), then the arrays, each aligned to ALIGN bytes.
    """
    arrays = {"paths_blob": index.files.blob, "paths_offsets": index.files.offsets,
              "labels": index.labels, "sizes": index.sizes, "mtimes": index.mtimes,
              "heights": index.heights, "widths": index.widths, "kinds": index.kinds}
    layout, offset = {}, 0
    for name, a in arrays.items():
        layout[name] = [a.dtype.str, list(a.shape), offset]
        offset += -(-a.nbytes // ALIGN) * ALIGN
    header = json.dumps({"key": index.key, "root": str(index.root), "classes": index.classes,
                         "bad": index.bad, "arrays": layout}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(8, "little") + header)
        for name, a in arrays.items():
            f.seek(start + layout[name][2])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(start + offset)


def read_index(path: Path, root=None) -> DatasetIndex | None:
    """The index stored at `path` (memory-mapped), or None if there is none or it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                return None
            meta = json.loads(f.read(int.from_bytes(head[len(MAGIC):], "little")))
            start = -(-f.tell() // ALIGN) * ALIGN
        whole = np.memmap(path, np.uint8, mode="r")
        a = {}
        for name, (dtype, shape, offset) in meta["arrays"].items():
            count = int(np.prod(shape))
            a[name] = np.frombuffer(whole, np.dtype(dtype), count, start + offset).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError):   # not an index of this layout
        return None
    return DatasetIndex(
        root=Path(root if root is not None else meta["root"]), key=meta["key"],
        files=PathTable(a["paths_blob"], a["paths_offsets"]), labels=a["labels"],
        classes=tuple(meta["classes"]), sizes=a["sizes"], mtimes=a["mtimes"],
        heights=a["heights"], widths=a["widths"], kinds=a["kinds"],
        bad=tuple((int(i), str(why)) for i, why in meta["bad"]), path=Path(path))


# ----------------------------------------------------------------- build and load

def build_index(images: ImageList, sizes, mtimes, workers: int | None = None,
                progress: bool = False) -> DatasetIndex:
    """Check every file of `images` (fastneg.data.files.check_files), in chunks for progress."""
    workers = available_cpus() if workers is None else workers
    n = len(images)
    heights, widths = np.zeros(n, np.int64), np.zeros(n, np.int64)
    kinds = np.full(n, KIND_OTHER, np.uint8)
    bad = []
    bar = None
    if progress:
        from fastneg.progress import tqdm
        bar = tqdm(total=n, unit="file", desc=f"checking {images.root}")
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        part = check_files(ImageList(images.root, images.files[a:b], images.labels[a:b],
                                     images.classes), workers)
        heights[a:b], widths[a:b] = part.heights, part.widths
        kinds[a:b][part.jpeg_rgb] = KIND_JPEG_RGB
        bad += [(a + i, why) for i, why in part.bad]
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    kinds[[i for i, _ in bad]] = KIND_BAD
    return DatasetIndex(images.root, folder_state(images, sizes, mtimes),
                        PathTable.from_strings(images.files), np.asarray(images.labels, np.int64),
                        tuple(images.classes), sizes, mtimes, heights, widths, kinds, tuple(bad))


def load_index(root, workers: int | None = None, progress: bool = False,
               rebuild: bool = False) -> DatasetIndex:
    """The index of the ImageFolder `root`, built (and stored) if missing or stale.

    Cheap when fresh: one listing and one stat per file, then a memory-mapped read. While one
    process builds, the others wait on its lock and then read what it wrote. `rebuild` forces a
    new check. Errors of scan_image_folder (missing root, empty class folder) pass through.
    Where neither ROOT nor the user cache can be written, the check runs and is not stored
    (with a warning): the loaders still start, each process checking every file.
    """
    images, sizes, mtimes = list_folder(root)
    key = folder_state(images, sizes, mtimes)
    if not rebuild:
        found = _fresh(root, key)
        if found is not None:
            return found
    try:
        path = _writable_location(root)
        lock = wait_lock(str(path) + LOCK_SUFFIX)
    except OSError as e:
        warnings.warn(f"cannot store the index of {root} next to it or in {cache_dir()} ({e}); "
                      "checking every file in this process", stacklevel=2)
        return build_index(images, sizes, mtimes, workers, progress)
    try:
        if not rebuild:   # another process may have built it while we waited for the lock
            found = _fresh(root, key)
            if found is not None:
                return found
        index = build_index(images, sizes, mtimes, workers, progress)
        write_index(path, index)
    finally:
        os.close(lock)
    return read_index(path, root=images.root)


def _fresh(root, key: str) -> DatasetIndex | None:
    for path in index_locations(root):
        index = read_index(path, root=Path(root))
        if index is not None and index.key == key:
            return index
    return None


# ----------------------------------------------------------------- the `fastneg index` verb

def register(sub) -> None:
    p = sub.add_parser("index", help="check an ImageFolder once and store its index",
                       description="List and check every file of an ImageFolder (header and "
                                   "end, no decode) and store the result next to the data "
                                   f"(ROOT/{INDEX_NAME}) or, when ROOT is read-only, in "
                                   "$XDG_CACHE_HOME/fastneg/index. The loaders read it instead "
                                   "of checking every file at every start; a changed folder "
                                   "(a file added, removed, resized or touched) is checked again.")
    p.add_argument("data", help="ImageFolder root (ROOT/<class>/<image>)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads reading files (default: the cores this process may use)")
    p.add_argument("--rebuild", action="store_true", help="check every file even if the "
                                                          "stored index is up to date")
    p.set_defaults(func=run)


def run(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    t0 = time.perf_counter()
    index = load_index(args.data, workers=args.workers, progress=True, rebuild=args.rebuild)
    took = time.perf_counter() - t0
    bad = f", {len(index.bad)} unreadable (listed in the index; the loaders stop on them " \
          "unless skip_bad)" if index.bad else ""
    print(f"{index.path}: {len(index)} files, {len(index.classes)} classes{bad} ({took:.1f} s)")
    for i, why in index.bad[:5]:
        print(f"  {index.files[i]}: {why}")
    if len(index.bad) > 5:
        print(f"  ... and {len(index.bad) - 5} more")
