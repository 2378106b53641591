"""`fastneg make-data --photos`: an ImageFolder of real photographs at ImageNet-like sizes.

Benchmarks of a data path need images that cost what real ones cost to decode: the synthetic
shapes are smooth and compress far better than photographs. This set is made offline from the
colour photos that ship with scikit-image (skimage.data): one class per source photo, each image a
random crop of it (area 35-100% of the largest crop of the target aspect, so zoomed 1-1.7x),
resized with Lanczos to an ImageNet-like size (longer side 500: 500x375, 375x500, 500x333 or
500x500), flipped left-right with probability 1/2, stored as JPEG quality 90 (4:2:0, like most
ImageNet files). Every draw comes from fastneg.kernels.rng (seed, image index), so the same
arguments give the same bytes. Layout: OUT/train/<photo>/<photo>_NNNNN.jpg.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from fastneg.fs import staged_dir
from fastneg.data.synthetic import _check_out_dir
from fastneg.kernels.rng import STREAM_PHOTOS, slot, uniform

# Colour photos bundled with scikit-image (no download): the class names.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
          "motorcycle", "retina", "rocket")
# (width, height, probability): ImageNet's common shapes at its typical longer side of 500 px.
SIZES = ((500, 375, 0.5), (375, 500, 0.2), (500, 333, 0.15), (500, 500, 0.15))
AREA = (0.35, 1.0)            # crop area as a fraction of the largest crop of the target aspect
QUALITY = 90
DEFAULT_IMAGES_PER_CLASS = 200  # 1,600 images: one epoch of 25 batches of 64
# Draw slots per image (fastneg.kernels.rng, sample = the image's index in the set).
_K_SIZE, _K_AREA, _K_TOP, _K_LEFT, _K_FLIP = range(5)


def load_photos() -> dict:
    """{name: uint8 [H, W, 3]} of the PHOTOS (bundled with scikit-image, read offline)."""
    try:
        import skimage.data
    except ImportError:
        raise ValueError("--photos needs scikit-image (pip install scikit-image)") from None
    photos = {}
    for name in PHOTOS:
        if name == "motorcycle":            # the left image of the stereo pair
            img = np.asarray(skimage.data.stereo_motorcycle()[0])
        else:
            img = np.asarray(getattr(skimage.data, name)())
        photos[name] = np.ascontiguousarray(img[..., :3], np.uint8)
    return photos


def crop_photo(photo: np.ndarray, seed: int, index: int) -> Image.Image:
    """Image `index` of the set cut from `photo` (module docstring), as a PIL RGB image."""
    def u(k):
        return uniform(seed, 0, index, slot(STREAM_PHOTOS, k))
    pick, total = u(_K_SIZE), 0.0
    for width, height, p in SIZES:
        total += p
        if pick < total:
            break
    h, w = photo.shape[:2]
    # largest crop of aspect width:height inside the photo, then a fraction of its area
    side = min(w / width, h / height)
    zoom = math.sqrt(AREA[0] + (AREA[1] - AREA[0]) * u(_K_AREA))
    cw = max(1, min(w, round(width * side * zoom)))
    ch = max(1, min(h, round(height * side * zoom)))
    top = int((h - ch + 1) * u(_K_TOP))
    left = int((w - cw + 1) * u(_K_LEFT))
    img = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((width, height),
                                                                       Image.LANCZOS)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if u(_K_FLIP) < 0.5 else img


def make_photos(out, *, images_per_class: int = DEFAULT_IMAGES_PER_CLASS, seed: int = 0,
                force: bool = False) -> Path:
    """Write OUT/train (len(PHOTOS) classes x images_per_class JPEGs); returns OUT/train.

    Built beside `out` and swapped in when whole (fastneg.fs); an existing non-empty
    `out` is replaced only with force=True.
    """
    out = Path(out)
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int) \
            or images_per_class < 1:
        raise ValueError(f"images_per_class must be an integer >= 1, got {images_per_class!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    _check_out_dir(out, force)
    photos = load_photos()
    with staged_dir(out) as tmp:
        for label, name in enumerate(PHOTOS):
            folder = tmp / "train" / name
            folder.mkdir(parents=True)
            for j in range(images_per_class):
                img = crop_photo(photos[name], seed, label * images_per_class + j)
                img.save(folder / f"{name}_{j:05d}.jpg", quality=QUALITY)
    return out / "train"


def run(args) -> None:
    """The CLI verb (fastneg.data.cli): --photos --out OUT [--images-per-class N] [--seed S]."""
    per_class = (DEFAULT_IMAGES_PER_CLASS if args.images_per_class is None
                 else args.images_per_class)
    train = make_photos(args.out, images_per_class=per_class, seed=args.seed, force=args.force)
    print(f"wrote {train}: {len(PHOTOS)} classes x {per_class} photos")
