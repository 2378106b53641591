"""`fastneg convert --to ffcv DIR OUT.beton`: an ImageFolder to FFCV's .beton format.
(`fastneg convert --to wds DIR OUT`, tar shards: fastneg.data.shards; this module parses both.)

Layout (what fastneg.loaders.ffcv reads): sample i = dataset index i of
fastneg.data.imagefolder.scan_image_folder(DIR), with three fields
    image   RGBImageField, JPEG, re-encoded by OpenCV at `quality` after PIL decodes the file
            to RGB, shrunk (OpenCV INTER_AREA) so the longer side is at most `max_side`
    label   IntField, the class index; -1 marks a file that could not be decoded
    index   IntField, the dataset index
and with --texture-bank BANK (a JPEG texture bank of DIR) a fourth field
    texture BytesField, the sample's texture as stored in the bank (its JPEG file, not re-encoded)
and a sidecar OUT.beton.json: layout version, classes, source fingerprint, the bad files (and
the texture bank's folder and texture size). File and class names are stored as Python reads
them from the file system: a name that is not valid UTF-8 keeps its raw bytes as escaped surrogates ("\udcff"), so
os.fsencode(json.loads(sidecar)["bad"][k][1]) gives back the exact bytes of the name.

Every file is checked before writing (fastneg.data.files.check_files, stored in the dataset
index, fastneg.data.index); unreadable files stop the
conversion with their names unless skip_bad, which stores them as 1x1 placeholders with label -1
so that sample numbers stay dataset indices. Writing runs in a process of its own
(`convert_to_beton` starts one): FFCV's writer can deadlock on Numba's compile lock in a process
that has already run an FFCV Loader, and it hangs if a sample raises, so samples never raise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastneg.fs import check_writable as _check_writable
from fastneg.fs import swap_in, temporary_sibling, write_text_atomic

LAYOUT = "fastneg-beton"
LAYOUT_VERSION = 1
FIELDS = ("image", "label", "index")
TEXTURE_FIELD = "texture"    # optional fourth field (--texture-bank)
BAD_LABEL = -1
DEFAULT_MAX_SIDE = 512     # as in FFCV's ImageNet examples; larger sides mostly cost decode time
DEFAULT_QUALITY = 90
MAX_SIDE_LIMIT = 4096      # bounds the writer's page size (see _page_size) to 128 MiB


def sidecar_path(beton) -> Path:
    return Path(str(beton) + ".json")


class _Samples:
    """The indexed dataset FFCV's writer reads: (RGB array, label, index) per dataset index.

    Never raises (a raising sample hangs FFCV's writer): a file that fails to decode becomes a
    1x1 placeholder with label BAD_LABEL.
    """

    def __init__(self, images, skip: set[int], bank=None):
        self.images, self.skip, self.bank = images, skip, bank

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        texture = () if self.bank is None else (
            self.bank.encoded(int(self.bank.rows_for([i])[0])).copy(),)
        placeholder = (np.zeros((1, 1, 3), np.uint8), BAD_LABEL, i, *texture)
        if i in self.skip:
            return placeholder
        try:
            return decode_rgb(self.images.path(i)), int(self.images.labels[i]), i, *texture
        except Exception:   # noqa: BLE001 - reported after writing, see write_beton
            return placeholder


def decode_rgb(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _decode_problem(path) -> str:
    try:
        decode_rgb(path)
    except Exception as e:   # noqa: BLE001 - the message is the report
        return f"cannot be decoded ({e})"
    return "cannot be decoded"


def _page_size(max_side: int) -> int:
    """Smallest power of two >= 8 MiB (FFCV's default) holding twice a raw max_side^2 image."""
    need = max(8 << 20, 2 * 3 * max_side * max_side)
    return 1 << (need - 1).bit_length()


def write_beton(src, out, *, max_side: int = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY,
                skip_bad: bool = False, workers: int | None = None, force: bool = False,
                texture_bank=None) -> dict:
    """Write the .beton and its sidecar in this process (see the module docstring); returns the
    sidecar's content. Use convert_to_beton from a process that may have run an FFCV Loader."""
    from fastneg.data.files import available_cpus, require_readable
    from fastneg.data.index import load_index

    if not 1 <= max_side <= MAX_SIDE_LIMIT:
        raise ValueError(f"--max-side must be in [1, {MAX_SIDE_LIMIT}], got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in [1, 100], got {quality}")
    out = Path(out)
    if out.suffix != ".beton":
        raise ValueError(f"output file {out} should end in .beton")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    workers = workers or available_cpus()
    _check_writable(out.parent)     # before minutes of work, not after
    check = load_index(src, workers=workers).file_check()   # the dataset's stored check
    images = check.images
    require_readable(check, skip_bad)
    bad = dict(check.bad)
    bank = None
    if texture_bank is not None:
        from fastneg.texture.store import BankReader
        bank = BankReader(texture_bank, expect=images)     # a bank made from `src`
        if bank.storage != "jpeg":
            raise ValueError(f"texture bank {texture_bank} is stored raw; the .beton stores JPEG "
                             "textures: rebuild it with fastneg build-bank --format jpeg")

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_sibling(out)   # swapped in when complete
    try:
        return _write(images, check, bad, out, partial, max_side, quality, workers, skip_bad, bank)
    finally:
        partial.unlink(missing_ok=True)    # after any error: no half-written file is left


def _write(images, check, bad, out, partial, max_side, quality, workers, skip_bad, bank) -> dict:
    from fastneg.data.ffcv_import import import_ffcv
    import_ffcv()   # first: skips the Numba compilation FFCV's own import would do (2.4 s)
    from ffcv.fields import BytesField, IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_side,
                                     jpeg_quality=quality),
              "label": IntField(), "index": IntField()}
    if bank is not None:
        fields[TEXTURE_FIELD] = BytesField()
    writer = DatasetWriter(str(partial), fields, page_size=_page_size(max_side),
                           num_workers=workers)
    writer.from_indexed_dataset(_Samples(images, set(bad), bank))

    labels = Reader(str(partial)).metadata["f1"]
    for i in np.flatnonzero(labels == BAD_LABEL).tolist():
        if i not in bad:
            bad[i] = _decode_problem(images.path(i))
    if len(bad) > len(check.bad) and not skip_bad:
        new = [f"  {images.path(i)}: {bad[i]}" for i in sorted(set(bad) - dict(check.bad).keys())]
        raise ValueError(f"{len(new)} file(s) in {images.root} cannot be decoded:\n"
                         + "\n".join(new[:5]) + "\nfix or remove them, or pass --skip-bad")
    info = {"layout": LAYOUT, "version": LAYOUT_VERSION, "source": str(images.root.resolve()),
            "fingerprint": images.fingerprint(), "classes": list(images.classes),
            "samples": len(images), "max_side": max_side, "quality": quality,
            "bad": [[i, images.files[i], bad[i]] for i in sorted(bad)]}
    if bank is not None:
        info["texture_bank"] = {"path": str(bank.path.resolve()), "size": bank.size}
    write_text_atomic(sidecar_path(out), json.dumps(info, indent=1))
    swap_in(partial, out)
    return info


def convert_to_beton(src, out, *, max_side: int = DEFAULT_MAX_SIDE,
                     quality: int = DEFAULT_QUALITY, skip_bad: bool = False,
                     workers: int | None = None, force: bool = False,
                     progress: bool = True, texture_bank=None) -> Path:
    """`fastneg convert --to ffcv` in a child process (safe from any process); returns `out`.

    Errors of the conversion come back as ValueError with the child's message.
    """
    cmd = [sys.executable, "-m", "fastneg.data.convert", "convert", "--to", "ffcv", str(src),
           str(out), "--max-side", str(max_side), "--quality", str(quality)]
    cmd += ["--skip-bad"] * skip_bad + ["--force"] * force
    cmd += ["--workers", str(workers)] if workers else []
    cmd += ["--texture-bank", str(texture_bank)] if texture_bank is not None else []
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        # The child's own error line and what follows, without its progress bar.
        detail = (done.stderr or "").rpartition("fastneg convert: error: ")[2].strip()
        raise ValueError(f"conversion of {src} to {out} failed: "
                         f"{detail or f'exit status {done.returncode}, see its stderr'}")
    return Path(out)


def register(sub) -> None:
    c = sub.add_parser("convert", help="convert an ImageFolder for a loader (FFCV .beton, "
                                       "WebDataset tar shards)",
                       description="Convert an ImageFolder to FFCV's .beton (plus OUT.json "
                                   "sidecar) for `build_loader('ffcv', OUT)`, images stored "
                                   "as JPEG, longer side at most --max-side; or (--to wds) to a "
                                   "folder OUT of tar shards in the WebDataset layout (KEY.jpg + "
                                   "KEY.cls, the files unchanged) with DALI index files and a "
                                   "manifest, for the dali and torch loaders "
                                   "(see fastneg.data.shards).")
    c.add_argument("--to", required=True, choices=["ffcv", "wds"], help="target format")
    c.add_argument("src", help="ImageFolder root (ROOT/<class>/<image>)")
    c.add_argument("out", help="output file, e.g. train.beton; for wds an output folder")
    c.add_argument("--shard-size", default=None,
                   help="wds: bytes per shard, e.g. 1GB, 500MB, 64KiB (default 1GB)")
    c.add_argument("--prefix", default="train",
                   help="wds: shard file names PREFIX-0000.tar ... (default train)")
    c.add_argument("--seed", type=int, default=0,
                   help="wds: seed of the order that spreads the images over the shards "
                        "(default 0)")
    c.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"ffcv: longest stored side in pixels (default {DEFAULT_MAX_SIDE})")
    c.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help=f"ffcv: JPEG quality of the stored images (default {DEFAULT_QUALITY})")
    c.add_argument("--skip-bad", action="store_true",
                   help="store unreadable files as placeholders that loaders skip (wds: leave "
                        "them out, listed in the manifest), instead of stopping")
    c.add_argument("--workers", type=int, default=None, help="processes (default: available cores)")
    c.add_argument("--texture-bank", metavar="BANK", default=None,
                   help="also store each image's texture from this JPEG texture bank (for "
                        "build_loader('ffcv', ..., texture_bank=...))")
    c.add_argument("--force", action="store_true",
                   help="replace an existing output file (or folder)")
    c.set_defaults(func=run)


def run(args) -> None:
    if args.to == "wds":
        if args.texture_bank is not None:
            raise ValueError("--texture-bank applies to --to ffcv: the loaders fetch a shard "
                             "sample's texture from the bank by its key (pass the bank to "
                             "the loader or trainer instead)")
        from fastneg.data import shards
        args.shard_size = args.shard_size or shards.DEFAULT_SHARD_SIZE
        return shards.run(args)
    if args.shard_size is not None:
        raise ValueError("--shard-size applies to --to wds only")
    info = write_beton(args.src, args.out, max_side=args.max_side, quality=args.quality,
                       skip_bad=args.skip_bad, workers=args.workers, force=args.force,
                       texture_bank=args.texture_bank)
    skipped = f", {len(info['bad'])} unreadable files stored as skipped" if info["bad"] else ""
    print(f"wrote {args.out}: {info['samples']} images, {len(info['classes'])} classes{skipped}")


def main(argv=None) -> int:
    """The convert verb alone: the child process of convert_to_beton imports nothing else."""
    parser = argparse.ArgumentParser(prog="fastneg")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as e:
        print(f"fastneg convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
