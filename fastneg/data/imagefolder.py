"""The one listing of an ImageFolder tree, shared by every loader, the texture bank and eval.

Order is torchvision's ImageFolder order (classes = sorted sub-folder names; files sorted within
a class, recursively), so dataset index i means the same image everywhere and a texture bank
built in this order pairs with Batch.indices.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageList:
    root: Path
    files: tuple[str, ...]        # paths relative to root, "class/name.jpg"
    labels: np.ndarray            # int64 [N]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def fingerprint(self) -> str:
        """sha256 of the (file, label) list: tells whether two listings are the same dataset."""
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels.tolist()):
            h.update(f"{f}\t{y}\n".encode())
        return h.hexdigest()


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
    for label, cls in enumerate(classes):
        found = []
        for dirpath, _, names in sorted(os.walk(root / cls, followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, name), root))
        if not found:
            empty.append(cls)
        files += found
        labels += [label] * len(found)
    if empty:
        raise FileNotFoundError(f"class folder(s) without images in {root}: {', '.join(empty)} "
                                f"(extensions: {' '.join(IMG_EXTENSIONS)})")
    return ImageList(root, tuple(files), np.asarray(labels, np.int64), tuple(classes))
