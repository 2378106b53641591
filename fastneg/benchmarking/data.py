"""The benchmarks' data: the default dataset, the texture bank and FFCV .beton of a run, a
folder of many tiny files, and endless finished training batches from a fastneg loader.
"""
from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fastneg.benchmarking.common import last_line
from fastneg.step import make_views_and_negatives, scaled_patch_range

LOADERS = ("dali", "ffcv", "torch")
NEGATIVES = ("none", "patch", "texture")
PHOTOS_DIR = "photos"          # default_data's folders under a data root
SYNTHETIC_DIR = "imagenet-like"
# 1,600 training images (photos: 200 per class x 8; synthetic: 160 x 10): one epoch covers
# throughput.py's default 2 warm-up + 20 measured batches of 64, so no row's timing includes an
# epoch boundary.
DEFAULT_IMAGES_PER_CLASS = 160
TEXTURE_BANK_SIZE = 64         # the published baseline's texture files
BANK_DIR = "bank"              # fastneg's JPEG texture bank, in a run's temporary folder
TEXTURE_BETON = "textures.beton"   # FFCV: the data with the bank's texture field, same folder
VARIANTS = 16                  # generate_folder: distinct encoded images under many names


def default_data(data_root: Path, synthetic: bool = False) -> Path:
    """The benchmarks' default dataset's train folder under `data_root` (a checkout's data/),
    generated on first use: data_root/photos (PHOTOS_DIR), or data_root/imagenet-like
    (SYNTHETIC_DIR) when `synthetic`. A folder holding another number of images (an older
    default) is made again."""
    default, synthetic_root = Path(data_root) / PHOTOS_DIR, Path(data_root) / SYNTHETIC_DIR
    if not synthetic:
        from fastneg.data.photos import DEFAULT_IMAGES_PER_CLASS as PER_CLASS
        from fastneg.data.photos import PHOTOS, make_photos
        train = default / "train"
        # written whole or not at all (fastneg.fs); a set of another size (an older
        # default) is made again
        if not train.is_dir() or sum(1 for _ in train.rglob("*.jpg")) != len(PHOTOS) * PER_CLASS:
            print(f"generating the benchmark photos in {default} (once), like: fastneg "
                  f"make-data --photos --out {default} --force", file=sys.stderr,
                  flush=True)
            make_photos(default, force=True)
        return train
    from fastneg.data.synthetic import SHAPES, DatasetSpec, make_dataset, read_metadata
    train = synthetic_root / "train"
    if not (train / "metadata.csv").exists() or \
            len(read_metadata(train)) != len(SHAPES) * DEFAULT_IMAGES_PER_CLASS:
        print(f"generating the benchmark dataset in {synthetic_root} (once), like: fastneg "
              f"make-data --out {synthetic_root} --imagenet-like --images-per-class "
              f"{DEFAULT_IMAGES_PER_CLASS}", file=sys.stderr, flush=True)
        make_dataset(synthetic_root, DatasetSpec(images_per_class=DEFAULT_IMAGES_PER_CLASS,
                                                 imagenet_like=True), force=True)
    return train


class FastnegBatches:
    """Endless finished batches (views, negatives) from a fastneg loader, made by the trainer's
    step (fastneg.step); built eagerly so that an unavailable backend fails here, not at the
    first batch."""

    def __init__(self, kind, source, *, batch_size, size, device, workers, negatives,
                 texture_bank=None, seed=0):
        from fastneg.augment import MoCoV2Augment
        from fastneg.loaders import build_loader
        self.loader = build_loader(kind, str(source), batch_size=batch_size, size=size,
                                   device=str(device), seed=seed, workers=workers,
                                   texture_bank=texture_bank)
        self.aug = MoCoV2Augment()
        self.negatives, self.seed = negatives, seed
        self.patch_range = scaled_patch_range(size)
        self.source = source

    def __iter__(self):
        step, epoch = 0, 0
        while True:
            self.loader.set_epoch(epoch)
            empty = True
            for batch in self.loader:
                empty = False
                yield self.finish(batch, step)
                step += 1
            if empty:
                raise ValueError(f"dataset {self.source} has fewer images than the batch size")
            epoch += 1

    def finish(self, batch, step):
        """Loader batch -> (views, negatives), on the device, as the trainer makes them."""
        return make_views_and_negatives(batch, aug=self.aug, seed=self.seed, step=step,
                                        negatives=self.negatives, patch_range=self.patch_range)


def prepare_ffcv(data: Path, timeout: float, *, texture_bank: Path | None = None,
                 beton: Path | None = None) -> Path:
    """The dataset as a .beton next to it, converted once (in a subprocess: FFCV's writer can
    deadlock in a process that already ran a Loader). RuntimeError with the reason on failure.

    texture_bank: also store each image's texture from this JPEG bank (`fastneg convert
    --texture-bank`), in `beton`, converted every time (the bank is the run's own)."""
    if texture_bank is None:
        beton = data.parent / f"{data.name}.beton"
        if beton.exists() and beton.stat().st_mtime >= data.stat().st_mtime:
            return beton
    cmd = [sys.executable, "-m", "fastneg.cli", "convert", "--to", "ffcv", str(data), str(beton)]
    if texture_bank is not None:
        cmd += ["--texture-bank", str(texture_bank), "--force"]
    print(f"converting {data} to {beton}" + (" with the texture bank's field" if texture_bank
                                             else " (once)"), file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"'fastneg convert --to ffcv' took more than {timeout:.0f} s") from None
    if done.returncode != 0 or not beton.exists():
        beton.unlink(missing_ok=True)
        raise RuntimeError(f"'fastneg convert --to ffcv' failed: {last_line(done.stderr)}")
    return beton


def write_texture_bank(data: Path, size: int, workdir: Path) -> Path:
    """The benchmark's textures: every image resized to size x size, as a JPEG q90 texture bank
    workdir/BANK_DIR of `data` (fastneg's format, one texture per image: returned), and the
    first TEXTURE_BANK_SIZE of them as JPEG q90 files workdir/texture_*.jpg (baseline)."""
    from PIL import Image

    from fastneg.data.imagefolder import scan_image_folder
    from fastneg.texture.build import write_bank_from_arrays
    listing = scan_image_folder(data)

    def textures():
        for i in range(len(listing)):
            with Image.open(listing.path(i)) as img:
                tex = img.convert("RGB").resize((size, size), Image.BILINEAR)
            if i < TEXTURE_BANK_SIZE:
                tex.save(workdir / f"texture_{i:04d}.jpg", quality=90)
            yield np.asarray(tex)
    return write_bank_from_arrays(data, workdir / BANK_DIR, textures(), quality=90,
                                  algorithm="resized-images (benchmark)")


def generate_folder(root: Path, images: int, classes: int) -> float:
    """Write `images` tiny JPEGs (VARIANTS distinct ones) into `classes` folders; seconds."""
    from PIL import Image

    t0 = time.perf_counter()
    encoded = []
    rng = np.random.default_rng(0)
    for k in range(VARIANTS):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(buf, "JPEG", quality=85)
        encoded.append(buf.getvalue())
    per_class = -(-images // classes)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(c * per_class, min(images, (c + 1) * per_class)):
            with open(folder / f"n{c:08d}_{k}.JPEG", "wb") as f:
                f.write(encoded[k % VARIANTS])
    return time.perf_counter() - t0
