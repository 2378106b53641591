"""The one listing of an ImageFolder tree, shared by every loader, the texture bank and eval.

Order is torchvision's ImageFolder order (classes = sorted sub-folder names; files sorted within
a class, recursively), so dataset index i means the same image everywhere and a texture bank
built in this order pairs with Batch.indices.

Within a class folder symlinks are followed, but no folder twice (by device and inode): a link
loop is listed once, with a warning. Files with other extensions are not listed; they are
counted in `ImageList.ignored` and named in a warning, so that a user knows why a class is
smaller than its folder.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("fastneg.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageList:
    root: Path
    files: tuple[str, ...]        # paths relative to root, "class/name.jpg"
    labels: np.ndarray            # int64 [N]
    classes: tuple[str, ...]
    # what the listing left out: {".gif": 3, "(no extension)": 1}, and the folders reached
    # a second time through a symlink (not followed again), relative to root
    ignored: dict[str, int] = field(default_factory=dict, compare=False)
    repeated_dirs: tuple[str, ...] = field(default=(), compare=False)

    def report(self) -> str:
        """One line: images, classes, and what was left out ("ignored: 1 .gif")."""
        line = f"{len(self.files)} images in {len(self.classes)} classes"
        if self.ignored:
            line += "; ignored: " + ", ".join(f"{n} {ext}" for ext, n in sorted(self.ignored.items()))
        if self.repeated_dirs:
            line += (f"; {len(self.repeated_dirs)} folder(s) reached again through a symlink, "
                     f"not followed: {', '.join(self.repeated_dirs[:3])}")
        return line

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def fingerprint(self) -> str:
        """sha256 of the (file, label, size, mtime) list: tells whether two listings are the
        same dataset, pixels included (a file rewritten in place changes its size or mtime).

        Copies keep the fingerprint only when they keep modification times (cp -p, rsync -t,
        shutil.copy2). A file that cannot be stat'ed counts as size and mtime -1.
        """
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels.tolist()):
            try:
                st = os.stat(self.root / f)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size = mtime = -1
            h.update(os.fsencode(f) + f"\t{y}\t{size}\t{mtime}\n".encode())
        return h.hexdigest()


class PathTable:
    """The absolute paths of a listing's files, packed into one bytes buffer with offsets instead
    of a Python string per file: 38 bytes per file instead of 108 for ImageNet's names (1.28M
    files: 49 MB instead of 138 MB in every loader of every rank). Indexable like the list of
    str it replaces: table[i] == str(listing.path(i))."""

    def __init__(self, root, files):
        self.root = str(Path(root))
        encoded = [os.fsencode(f) for f in files]
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)

    @classmethod
    def of(cls, listing: ImageList) -> "PathTable":
        return cls(listing.root, listing.files)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"file index {i} out of range for {len(self)} files")
        start, end = self._offsets[i], self._offsets[i + 1]
        return os.path.join(self.root, os.fsdecode(self._blob[start:end]))


def scan_image_folder(root) -> ImageList:
    """List an ImageFolder; a clear error for a missing/empty root or an empty class folder."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {root} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"dataset folder {root} has no class sub-folders "
                                "(expected ROOT/<class>/<image>)")
    files, labels, empty = [], [], []
    ignored: dict[str, int] = {}
    repeated: list[str] = []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, names in _walk_once(root / cls, root, repeated):
            for name in names:
                if name.lower().endswith(IMG_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
                elif not name.startswith("."):
                    ext = os.path.splitext(name)[1].lower() or "(no extension)"
                    ignored[ext] = ignored.get(ext, 0) + 1
        if not found:
            empty.append(cls)
        files += found
        labels += [label] * len(found)
    listing = ImageList(root, tuple(files), np.asarray(labels, np.int64), tuple(classes),
                        ignored, tuple(repeated))
    if empty:
        raise FileNotFoundError(f"class folder(s) without images in {root}: {', '.join(empty)} "
                                f"(extensions: {' '.join(IMG_EXTENSIONS)}; {listing.report()})")
    if ignored or repeated:
        log.warning("%s: %s", root, listing.report())
    return listing


def _walk_once(top: Path, root: Path, repeated: list):
    """(dirpath, sorted file names) of every folder under `top` in sorted path order, following
    symlinks but entering no folder twice (same device and inode); each folder skipped is
    appended to `repeated`, relative to root."""
    seen = set()
    found = []
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            repeated.append(os.path.relpath(dirpath, root))
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()    # depth first in name order: which path of a repeated folder counts
        found.append((dirpath, sorted(names)))
    return sorted(found)
