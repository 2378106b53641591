"""What every backend shares, so that all three agree on files, order, shards and crops.

- `LoaderConfig`: the checked arguments of build_loader.
- `checked_image_folder`: an ImageFolder's listing and pre-flight check (fastneg.data.files), read
  from its dataset index (fastneg.data.index, built once per dataset), which also gives the image
  sizes the crop boxes need before decoding.
- `epoch_order` / `shard`: one permutation per (seed, epoch) from fastneg's RNG, cut per rank.
- `replace_failed`: with skip_bad, a sample whose file failed to decode is replaced by another of
  the same shard, deterministically, so every rank's batches keep their size.
- `crop_boxes` / `center_box`: the crop windows, from fastneg.kernels.crop.
- `texture_params` / `open_texture_bank`: the textures (a third view) of a loader with a bank.
- `default_workers`: CPU threads / processes per rank when build_loader is not told.
- `LoaderBase`: set_epoch, len, the skip count and its report at the end of each epoch.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numba
import numpy as np
import torch

from fastneg.data.files import (FileCheck, UnreadableFiles, available_cpus,  # noqa: F401
                                check_files, inspect_file, require_readable)
from fastneg.data.imagefolder import PathTable
from fastneg.data.index import load_index
from fastneg.kernels import crop, rng, textures

# The texture crop: sample_textures' defaults, which the trainer uses.
TEXTURE_SCALE = (0.2, 1.0)
TEXTURE_RATIO = (3 / 4, 4 / 3)
MAX_DEFAULT_WORKERS = 12   # decode threads per rank beyond this rarely pay (see default_workers)
from fastneg.kernels.jit import cached_njit

log = logging.getLogger("fastneg.loaders")

EVAL_CROP_FRACTION = 0.875  # eval: resize the shorter side to size / 0.875, centre crop size


@dataclass(frozen=True)
class LoaderConfig:
    """build_loader's keyword arguments, checked once; every backend reads them from here."""
    batch_size: int
    views: int = 2
    size: int = 224
    scale: tuple[float, float] | None = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    workers: int | None = None
    drop_last: bool = True
    shuffle: bool = True
    skip_bad: bool = False
    report_skipped: bool = True       # False: the caller reports loader.bad_files itself
    texture_bank: str | None = None   # a jpeg texture bank folder: Batch.textures (see Batch)

    def __post_init__(self):
        for name in ("batch_size", "views", "size", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        object.__setattr__(self, "seed", rng.check_counter("seed", self.seed))
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"workers must be None or an integer >= 0, got {self.workers!r}")
        if self.scale is None:
            if self.views != 1:
                raise ValueError("scale=None (resize + centre crop, for evaluation) needs views=1, "
                                 f"got views={self.views}")
        elif not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1 or None, "
                             f"got {self.scale!r}")
        if not (len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA GPU on this machine")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "workers", default_workers() if self.workers is None
                           else self.workers)


def default_workers() -> int:
    """Threads (DALI, FFCV) or processes (torch) per rank: this process's usable cores shared
    by the ranks of the node (LOCAL_WORLD_SIZE, set by torchrun), at most MAX_DEFAULT_WORKERS.

    Without the split, 8 ranks on a 192-core node would each start 192 threads.
    """
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus() // local))


# ----------------------------------------------------------------- pre-flight file check

def checked_image_folder(root, cfg: LoaderConfig) -> FileCheck:
    """List and check an ImageFolder: clear errors for a missing/empty root or class folder and,
    unless cfg.skip_bad, for any file no loader can read.

    The check comes from the dataset index (fastneg.data.index.load_index): the first process
    to need it checks every file while the others (the node's other ranks) wait on its lock;
    after that every start costs one stat per file.
    """
    check = load_index(root, workers=cfg.workers).file_check()
    require_readable(check, cfg.skip_bad)
    return check



# ----------------------------------------------------------------- order and shards

@cached_njit()
def _shuffle_keys(seed, epoch, indices, slot, out):
    for k in range(indices.shape[0]):
        out[k] = rng.mix_cpu(seed, epoch, indices[k], slot)


def epoch_order(indices: np.ndarray, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of `indices`: sorted by an RNG key of (seed, epoch, index), or as given.

    A function of (seed, epoch, the index set) only, so every rank and backend computes the same.
    """
    indices = np.ascontiguousarray(indices, np.int64)
    if not shuffle:
        return indices
    keys = np.empty(indices.shape[0], np.uint32)
    _shuffle_keys(seed, epoch, indices, rng.slot(rng.STREAM_SHUFFLE, 0), keys)
    return indices[np.argsort(keys, kind="stable")]


def shard(order: np.ndarray, rank: int, world_size: int, batch_size: int,
          drop_last: bool) -> np.ndarray:
    """This rank's samples, in order: every world_size-th, from `rank`.

    drop_last=True: every rank gets the same number of full batches (the rest of the epoch is
    left out). drop_last=False: every sample exactly once across ranks; shard lengths differ by at
    most one, so near a batch boundary one rank may get one more (partial) batch.
    """
    mine = order[rank::world_size]
    if drop_last:
        full = (len(order) // world_size) // batch_size * batch_size
        mine = mine[:full]
    return np.ascontiguousarray(mine)    # DALI's external source takes dense batches only


def replace_failed(samples: np.ndarray, start: int, stop: int, failed) -> np.ndarray:
    """The batch samples[start:stop] with every index in `failed` replaced: in order, by the next
    samples of the shard after the batch (wrapping around) that are neither failed nor already in
    the batch (or, in a shard too small for that, by any good sample).

    A function of (samples, start, stop, failed) only, and only of the failures it meets: once
    the failures among a batch and its replacements are known, the batch is the same whether
    they were learnt in this epoch or an earlier one (or before a resume). ValueError if no
    sample is good.
    """
    batch = np.array(samples[start:stop], np.int64)
    slots = [k for k, i in enumerate(batch.tolist()) if i in failed]
    if not slots:
        return batch
    n, taken = len(samples), set(batch.tolist())
    order = [int(samples[(stop + j) % n]) for j in range(n)]
    good = [i for i in order if i not in failed]
    if not good:
        raise ValueError(f"every one of this rank's {n} samples failed to decode")
    fresh = iter([i for i in dict.fromkeys(good) if i not in taken])
    for j, k in enumerate(slots):
        batch[k] = next(fresh, good[j % len(good)])
    return batch


# ----------------------------------------------------------------- crop windows

def center_box(h, w, size):
    """(top, left, height, width): the square Resize(size / 0.875) + CenterCrop(size) keeps."""
    short = min(h, w)
    resized_short = int(size / EVAL_CROP_FRACTION)
    side = max(1, min(short, int(math.floor(short * size / resized_short + 0.5))))
    return (h - side) // 2, (w - side) // 2, side, side


center_box_cpu = numba.njit(inline="always")(center_box)


def view_slot(view: int) -> int:
    """First RNG slot of view `view`'s crop: the views of one sample draw disjoint boxes."""
    return rng.slot(rng.STREAM_CROP, view * crop.SLOTS_PER_BOX)


def crop_boxes(cfg: LoaderConfig, epoch: int, indices, heights, widths, view: int) -> np.ndarray:
    """int64 [N, 4] (top, left, height, width): view `view` of samples `indices` in `epoch`.

    The box of a sample depends on (seed, epoch, dataset index, view, image size) only.
    """
    if cfg.scale is None:
        return np.array([center_box(int(h), int(w), cfg.size) for h, w in zip(heights, widths)],
                        np.int64).reshape(-1, 4)
    return crop.rrc_boxes(cfg.seed, epoch, indices, heights, widths, scale=cfg.scale,
                          ratio=cfg.ratio, slot0=view_slot(view))


# ----------------------------------------------------------------- textures (a third view)

@cached_njit()
def _texture_params(seed, epoch, indices, h, w, scale_lo, scale_hi, logr_lo, logr_hi, out):
    for k in range(indices.shape[0]):
        textures._draw_params_cpu(seed, epoch, indices[k], h, w, scale_lo, scale_hi, logr_lo,
                                  logr_hi, out[k])


def texture_params(seed: int, epoch: int, indices, size: int) -> np.ndarray:
    """int32 [N, 5] (top, left, height, width, flip) of the texture crops of dataset `indices`
    in `epoch`, for textures of size x size.

    Keyed by (seed, epoch, dataset index), like the views' boxes, with the texture stream and
    the draw function of fastneg.kernels.sample_textures: row k equals what sample_textures (and
    kernels.textures.draw_texture_params) draws for sample = indices[k] at step = epoch. Scale
    and ratio: TEXTURE_SCALE, TEXTURE_RATIO.
    """
    indices = np.ascontiguousarray(indices, np.int64)
    out = np.empty((len(indices), textures.PARAMS), np.int32)
    _texture_params(seed, epoch, indices, size, size, TEXTURE_SCALE[0], TEXTURE_SCALE[1],
                    math.log(TEXTURE_RATIO[0]), math.log(TEXTURE_RATIO[1]), out)
    return out


def open_texture_bank(path, images):
    """A BankReader over the jpeg texture bank `path` made from `images` (an ImageList), for a
    loader: ValueError for a raw bank (loaded whole by TextureBank.load instead) or another
    dataset's bank."""
    from fastneg.texture.source import fetched_by_loader
    from fastneg.texture.store import BankReader

    reader = BankReader(path, expect=images)
    if not fetched_by_loader(reader.meta):
        raise ValueError(f"texture bank {path} is stored raw: the loaders read JPEG banks "
                         "(rebuild it with fastneg build-bank --format jpeg), or load it whole "
                         "with TextureBank.load")
    texture_params(0, 0, np.zeros(1, np.int64), reader.size)   # compile now (before workers fork)
    return reader


# ----------------------------------------------------------------- loader plumbing

def describe_skipped(bad_files, where: str = "") -> str:
    """'skipped N unreadable file(s)WHERE (FILE: WHY; ... ...)' for (file, reason) pairs, the
    first three named: the one wording of the end-of-epoch report (the loaders', the
    trainer's)."""
    first = "; ".join(f"{f}: {why}" for f, why in bad_files[:3])
    more = " ..." if len(bad_files) > 3 else ""
    return f"skipped {len(bad_files)} unreadable file(s){where} ({first}{more})"


class LoaderBase:
    """The part of a Loader that does not depend on the backend.

    The epoch changes only through set_epoch (as with torch's DistributedSampler), so iterating
    twice without it repeats the same batches. Subclasses implement `_batches(epoch, samples)`,
    which yields Batch objects for this rank's `samples` in order.

    Skipped files: those the pre-flight check rejects never enter an epoch (every rank reads the
    same index, so the shards agree). A file that passes it but fails to decode (possible on the
    DALI and torch backends, which decode at run time) stays in the order, so that every rank
    keeps the same shards and batch count; without skip_bad it stops the epoch naming itself,
    with skip_bad the backend replaces it in its batch by `refill` (replace_failed: the next
    good samples of the same shard), so the batch keeps its size, and `samples` replaces it in
    later epochs before it is read.
    """
    kind = ""

    def __init__(self, cfg: LoaderConfig, good: np.ndarray, bad: tuple[tuple[str, str], ...],
                 classes: tuple[str, ...]):
        self.cfg = cfg
        self.classes = classes
        self.bad_files: list[tuple[str, str]] = list(bad)   # (file, reason), as found
        self.epoch = 0
        self._good = good
        self._failed: set[int] = set()   # dataset indices that failed to decode (skip_bad)
        self._shard_of: tuple[int, np.ndarray] | None = None   # (epoch, its shard), cached
        n = len(shard(good, cfg.rank, cfg.world_size, cfg.batch_size, cfg.drop_last))
        self._len = n // cfg.batch_size if cfg.drop_last else -(-n // cfg.batch_size)
        if self._len == 0:
            raise ValueError(f"{len(good)} images give rank {cfg.rank} of {cfg.world_size} no "
                             f"{'full ' if cfg.drop_last else ''}batch of {cfg.batch_size}: use "
                             "a smaller batch_size" + (" or drop_last=False" if cfg.drop_last
                                                       else ""))

    def _init_from_folder(self, data, cfg: LoaderConfig) -> tuple[FileCheck, PathTable, object]:
        """The opening of the ImageFolder backends (DALI, torch): list and check `data`
        (checked_image_folder), initialise LoaderBase with its readable files, and return the
        check, the files' paths (packed) and the texture bank's reader (None without one)."""
        check = checked_image_folder(data, cfg)
        LoaderBase.__init__(self, cfg, check.good, check.bad_files, check.images.classes)
        bank = None if cfg.texture_bank is None else open_texture_bank(cfg.texture_bank,
                                                                       check.images)
        return check, PathTable.of(check.images), bank

    @property
    def skipped(self) -> int:
        """How many files this loader has left out (pre-flight, plus decode failures so far)."""
        return len(self.bad_files)

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def _shard(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch order, before any replacement."""
        if self._shard_of is None or self._shard_of[0] != epoch:
            cfg = self.cfg
            order = epoch_order(self._good, cfg.seed, epoch, cfg.shuffle)
            self._shard_of = epoch, shard(order, cfg.rank, cfg.world_size, cfg.batch_size,
                                          cfg.drop_last)
        return self._shard_of[1]

    def samples(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices for `epoch`, in the order they are yielded (files known
        to fail to decode already replaced, see refill)."""
        mine = self._shard(epoch)
        if not self._failed:
            return mine
        bs = self.cfg.batch_size
        return np.concatenate([replace_failed(mine, s, min(s + bs, len(mine)), self._failed)
                               for s in range(0, len(mine), bs)])

    def refill(self, epoch: int, batch: int) -> np.ndarray:
        """Batch number `batch` of `epoch` with every file known to fail replaced by other
        samples of this rank's shard (replace_failed): the same size as planned."""
        mine, bs = self._shard(epoch), self.cfg.batch_size
        return replace_failed(mine, batch * bs, min((batch + 1) * bs, len(mine)), self._failed)

    def skip_or_raise(self, failures: list[tuple[str, str]], indices=()) -> None:
        """Decode failures of one batch (files and their dataset `indices`): remembered when
        skip_bad (refill then replaces them), else an error naming them."""
        if not self.cfg.skip_bad:
            listed = "\n".join(f"  {f}: {why}" for f, why in failures)
            raise UnreadableFiles(f"{self.kind} loader: file(s) that passed the pre-flight "
                                  f"check failed to decode:\n{listed}\nfix or remove them, or "
                                  "pass skip_bad=True", failures)
        self.bad_files += [f for f in failures if f not in self.bad_files]
        self._failed.update(int(i) for i in indices)

    def __iter__(self):
        epoch = self.epoch
        yield from self._batches(epoch, self.samples(epoch))
        if self.bad_files and self.cfg.rank == 0 and self.cfg.report_skipped:
            # once per epoch, not once per rank
            log.warning("%s loader, epoch %d: %s", self.kind, epoch,
                        describe_skipped(self.bad_files))

    def _batches(self, epoch: int, samples: np.ndarray):
        raise NotImplementedError
