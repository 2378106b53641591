"""Texture banks on disk, read back: the folder's format, its index, single textures for the
loaders (BankReader) and whole banks on a device (TextureBank). Building is fastneg.texture.build.

Layout of a bank folder (`storage` in index.json; BankSpec.storage, `--format`):

    jpeg (default): textures.jpg   the rows' JPEG files (quality BankSpec.quality), end to end
                    spans.i8       int64 [rows, 2]: (byte offset, length) of row r in textures.jpg
    raw:            textures.u8    raw uint8 [rows, size, size, 3] (numpy.memmap-able; C order)
    rows.npy      int64 [images]: texture row of each dataset image (dataset index order)
    sources.npy   int64 [rows]: dataset image each texture row was made from
    index.json    format, version, source root, dataset fingerprint, counts, synthesis
                  parameters, and `complete`
    done.u8       while building only: one byte per row, 1 once that row is durably written

Rows follow the dataset index order of fastneg.data.imagefolder (the loaders' order), so for a
full bank texture row i belongs to image i and Batch.indices select textures directly; a
smaller bank maps images to rows through rows.npy (the rule: fastneg.texture.build).
`complete` becomes true by an atomic rename of index.json after the last sync, so a bank that
was interrupted is never taken for a complete one.

The loaders read a jpeg bank like images (BankReader: one pread per texture, no whole-bank load,
so host memory does not grow with the bank); TextureBank.load puts a whole bank (either storage)
on a device, for small banks. Which of the two a training run uses is decided in one place:
fastneg.texture.source.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fastneg.data.imagefolder import ImageList, scan_image_folder

log = logging.getLogger("fastneg.texture")

FORMAT = "fastneg-texture-bank"
VERSION = 1
TEXTURES_FILE, INDEX_FILE, DONE_FILE = "textures.u8", "index.json", "done.u8"
ROWS_FILE, SOURCES_FILE, LOCK_FILE = "rows.npy", "sources.npy", ".lock"
JPEG_FILE, SPANS_FILE = "textures.jpg", "spans.i8"
BANK_FILES = (TEXTURES_FILE, INDEX_FILE, DONE_FILE, ROWS_FILE, SOURCES_FILE, LOCK_FILE,
              JPEG_FILE, SPANS_FILE)
STORAGES = ("jpeg", "raw")

def read_index(path) -> dict:
    """index.json of the bank folder `path`, checked to be a fastneg bank of a known version."""
    path = Path(path)
    index = path / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: {path} is not a texture bank "
                                "(make one with: fastneg build-bank DATA --out BANK)")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index} is not a {FORMAT} index (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{index} has version {meta.get('version')}; this fastneg reads "
                         f"version {VERSION}: rebuild the bank")
    for key, kind in INDEX_KEYS.items():
        if key not in meta:
            raise ValueError(f"{index} lacks the key {key!r}: the bank is damaged; rebuild it "
                             "with --force")
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise ValueError(f"{index}: {key!r} is {meta[key]!r}, not a {kind.__name__}: the "
                             "bank is damaged; rebuild it with --force")
    return meta


# keys of index.json that loading and resuming rely on, with their types
INDEX_KEYS = {"complete": bool, "rows": int, "images": int, "size": int, "fingerprint": str,
              "source_root": str}


# ---------------------------------------------------------------- reading

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def storage_of(meta: dict) -> str:
    """The storage of a bank's index.json ("raw" for banks written before there was a choice)."""
    return meta.get("storage", "raw")


class BankReader:
    """Reads single textures of a complete bank from disk, for the loaders: nothing is loaded
    up front but rows.npy (memory-mapped), so host memory stays flat however large the bank.

    Picklable (open files are reopened lazily in each process). `encoded(row)` gives a jpeg
    bank's JPEG bytes (uint8 [n]), `pixels(row)` any bank's uint8 [size, size, 3].
    """

    def __init__(self, path, *, expect=None):
        path = Path(path)
        meta = read_index(path)
        if not meta["complete"]:
            raise ValueError(f"texture bank {path} is incomplete: finish it with fastneg "
                             f"build-bank {meta['source_root']} --out {path} --resume")
        if expect is not None:
            _check_expected(path, meta, expect)
        self.path, self.meta, self.storage = path, meta, storage_of(meta)
        self.rows, self.size = meta["rows"], meta["size"]
        name = JPEG_FILE if self.storage == "jpeg" else TEXTURES_FILE
        expected = None if self.storage == "jpeg" else self.rows * self.size * self.size * 3
        data = path / name
        if not data.exists() or (expected is not None and data.stat().st_size != expected):
            raise ValueError(f"{data} is missing or has the wrong size: the bank is damaged; "
                             "rebuild it with --force")
        if self.storage == "jpeg" and (path / SPANS_FILE).stat().st_size != self.rows * 16:
            raise ValueError(f"{path / SPANS_FILE} does not hold {self.rows} spans: the bank is "
                             "damaged; rebuild it with --force")
        self._fd = None
        self._spans = None
        self._image_rows = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_spans": None, "_image_rows": None}

    def _open(self):
        if self._fd is None:
            name = JPEG_FILE if self.storage == "jpeg" else TEXTURES_FILE
            self._fd = os.open(self.path / name, os.O_RDONLY)
            if self.storage == "jpeg":
                self._spans = np.memmap(self.path / SPANS_FILE, np.int64, mode="r",
                                        shape=(self.rows, 2))
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def rows_for(self, indices: np.ndarray) -> np.ndarray:
        """Texture rows of dataset `indices` (int64 numpy), from rows.npy."""
        if self._image_rows is None:
            self._image_rows = np.load(self.path / ROWS_FILE, mmap_mode="r")
        return np.asarray(self._image_rows[np.asarray(indices, np.int64)], np.int64)

    def encoded(self, row: int) -> np.ndarray:
        """uint8 [n]: the JPEG file of texture `row` (jpeg banks only)."""
        if self.storage != "jpeg":
            raise ValueError(f"texture bank {self.path} is stored raw, not as JPEG")
        fd = self._open()
        offset, length = (int(v) for v in self._spans[row])
        return np.frombuffer(os.pread(fd, length, offset), np.uint8)

    def pixels(self, row: int) -> np.ndarray:
        """uint8 [size, size, 3]: texture `row`, decoded (jpeg) or read (raw)."""
        if self.storage == "jpeg":
            import io
            with Image.open(io.BytesIO(self.encoded(row).tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        nbytes = self.size * self.size * 3
        data = os.pread(self._open(), nbytes, row * nbytes)
        return np.frombuffer(data, np.uint8).reshape(self.size, self.size, 3)


class TextureBank:
    """A complete bank in memory: `.textures` uint8 [rows, size, size, 3] on the device.

    placement: "cuda" (device memory), "pinned" (page-locked host memory: the bank did not fit
    the GPU budget), "mmap" (CPU, a raw bank memory-mapped from the file: pages load on first
    use) or "memory" (CPU, a jpeg bank decoded whole).
    """

    def __init__(self, textures, image_rows, meta: dict, placement: str):
        self.textures = textures
        self.image_rows = image_rows      # int64 [images] tensor on the CPU
        self.meta = meta
        self.placement = placement
        self._rows_on = {}

    def __len__(self) -> int:
        return self.textures.shape[0]

    @property
    def size(self) -> int:
        return self.meta["size"]

    @classmethod
    def load(cls, path, device="cpu", *, expect=None, gpu_budget: float = 0.5) -> TextureBank:
        """Load a complete bank onto `device`.

        expect: the dataset the bank must belong to: an ImageList, a dataset folder, or a
        fingerprint (64 hex digits); a bank made from another listing raises ValueError.
        gpu_budget: on CUDA, the bank goes to device memory when it takes at most this fraction
        of the free memory (the rest is the model's); otherwise to pinned host memory.
        """
        import torch
        path = Path(path)
        meta = read_index(path)
        if not meta["complete"]:
            done = path / DONE_FILE
            got = int(np.fromfile(done, np.uint8).sum()) if done.exists() else 0
            raise ValueError(f"texture bank {path} is incomplete ({got} of {meta['rows']} "
                             "textures): finish it with fastneg build-bank "
                             f"{meta['source_root']} --out {path} --resume")
        if expect is not None:
            _check_expected(path, meta, expect)
        rows, size = meta["rows"], meta["size"]
        shape = (rows, size, size, 3)
        image_rows = torch.from_numpy(np.load(path / ROWS_FILE))
        if len(image_rows) != meta["images"]:
            raise ValueError(f"{path / ROWS_FILE} has {len(image_rows)} entries, index.json "
                             f"says {meta['images']} images: rebuild the bank with --force")
        if storage_of(meta) == "jpeg":
            # Decoded whole into host memory: for small banks (large ones go through the loaders).
            reader = BankReader(path)
            array = np.empty(shape, np.uint8)
            for r in range(rows):
                array[r] = reader.pixels(r)
        else:
            tex_path = path / TEXTURES_FILE
            if not tex_path.exists() or tex_path.stat().st_size != math.prod(shape):
                raise ValueError(f"{tex_path} does not hold {rows} textures of {size}x{size}x3 "
                                 "bytes: the bank is damaged; rebuild it with --force")
            # mode "c" (copy-on-write) gives a writable view for torch without touching the file.
            array = np.memmap(tex_path, np.uint8, mode="c", shape=shape)
        device = torch.device(device)
        nbytes = array.nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            on_gpu = nbytes <= gpu_budget * free
            textures = torch.empty(shape, dtype=torch.uint8,
                                   **({"device": device} if on_gpu else {"pin_memory": True}))
            step = max(1, (256 << 20) // (size * size * 3))    # copy in 256 MiB slices
            for a in range(0, rows, step):
                textures[a:a + step].copy_(torch.from_numpy(array[a:a + step]))
            placement = "cuda" if on_gpu else "pinned"
            where = (f"GPU memory of {device}" if on_gpu else
                     f"pinned host memory (over {gpu_budget:.0%} of the {free / 2**30:.1f} GiB "
                     f"free on {device})")
        elif device.type == "cpu":
            textures, placement = torch.from_numpy(array), "mmap"
            where = "CPU memory (memory-mapped)"
            if storage_of(meta) == "jpeg":
                placement, where = "memory", "CPU memory (decoded)"
        else:
            raise ValueError(f"texture bank device must be cpu or cuda, got {device}")
        # Pinned memory works but costs a host-to-device gather per batch: a warning, not info.
        log.log(logging.WARNING if placement == "pinned" else logging.INFO,
                "texture bank %s: %d textures of %dx%d, %.2f GiB, in %s",
                path, rows, size, size, nbytes / 2**30, where)
        return cls(textures, image_rows, meta, placement)

    def rows_for(self, indices):
        """Texture rows of dataset `indices` (a tensor, on any device): identity for a full bank."""
        dev = indices.device
        if dev not in self._rows_on:
            self._rows_on[dev] = self.image_rows.to(dev)
        return self._rows_on[dev][indices]

    def for_batch(self, indices):
        """(bank, ids) for fastneg.kernels.sample_textures on the device of `indices`.

        A bank on that device is used in place (ids = its rows); a pinned or CPU bank gives up
        just the batch's textures, copied over, with ids 0..N-1.
        """
        import torch
        if self.textures.device == indices.device:
            return self.textures, self.rows_for(indices)
        rows = self.rows_for(indices.cpu())
        picked = self.textures.index_select(0, rows).to(indices.device)
        return picked, torch.arange(len(indices), device=indices.device)


def _check_expected(path: Path, meta: dict, expect) -> None:
    if isinstance(expect, ImageList):
        listing = expect
    elif isinstance(expect, str) and _FINGERPRINT.fullmatch(expect):
        listing = None
    else:
        listing = scan_image_folder(expect)
    want = listing.fingerprint() if listing is not None else expect
    if want != meta["fingerprint"]:
        what = (f"{listing.root} ({len(listing)} images)" if listing is not None
                else f"fingerprint {want[:12]}")
        raise ValueError(f"texture bank {path} was built for {meta['source_root']} "
                         f"({meta['images']} images, fingerprint {meta['fingerprint'][:12]}), "
                         f"not for {what}: rebuild it with fastneg build-bank DATA --out {path} "
                         "--force")

