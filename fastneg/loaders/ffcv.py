"""The FFCV backend: reads a .beton written by `fastneg convert --to ffcv` (fastneg.data.convert).

One compiled stage does everything per batch, on FFCV's CPU threads: decode each JPEG once
(libjpeg-turbo) into a scratch buffer, then for each view crop the fastneg window (the same
kernels.crop box as the other backends, for the stored image size) and resize it with OpenCV's
INTER_AREA into a view-major [views, N, size, size, 3] buffer, so each view is contiguous. The
whole pipeline is compiled (no compiled -> Python -> compiled alternation, which hangs FFCV's
Loader, upstream #396); labels and indices come from the beton's fields.

The epoch's order and shard come from loaders.common and are handed to FFCV's epoch iterator
directly; FFCV's own traversal orders (and their RANDOM/distributed sampler) are not used.

Textures (a beton converted with `--texture-bank`, loader built with texture_bank=...): a second
compiled stage, TextureCrops, decodes each sample's stored texture JPEG, crops it with
loaders.common.texture_params' box (drawn in the stage by the same function, keyed by
(seed, epoch, dataset index)), resizes it with INTER_AREA and flips it.

On a GPU, each batch is copied out of FFCV's pinned output slot on a copy stream, and an event
recorded after the copies is waited on (host side) before the next batch is taken from FFCV:
FFCV's thread refills that slot a few batches later, and taking the next batch is what lets it.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastneg.data.ffcv_import import import_ffcv

import_ffcv()   # first: FFCV's own import would compile Numba's typed dict (2.4 s, every process)
import ffcv._libffcv  # noqa: E402 (FFCV's imports after import_ffcv)
import ffcv.libffcv
import llvmlite.binding as llvm
import numba
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.loader import Loader as FfcvLoader
from ffcv.loader import OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.types import CURRENT_VERSION, HeaderType
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from fastneg.data import convert
from fastneg.kernels.crop import rrc_box_cpu
from fastneg.kernels.jit import cached_njit
from fastneg.kernels.textures import PARAMS, _draw_params_cpu
from fastneg.loaders import common
from fastneg.loaders.batch import Batch
from fastneg.loaders.common import (TEXTURE_RATIO, TEXTURE_SCALE, LoaderBase, LoaderConfig,
                                    center_box_cpu, view_slot)

# FFCV's JPEG decoder and OpenCV resize, called by symbol name instead of through ffcv.libffcv's
# ctypes pointers: Numba cannot cache a kernel that holds a pointer constant, and can cache one
# that calls a named symbol, so the decode kernels below load from the cache in a second process
# instead of compiling there (2.1 s of its first batch). The signatures are ffcv 1.0.2's
# (libffcv.cpp), checked against ffcv.libffcv's ctypes declarations.
if (len(ffcv.libffcv.ctypes_imdecode.argtypes), len(ffcv.libffcv.ctypes_resize.argtypes)) \
        != (13, 11):
    raise ImportError("this FFCV's libffcv has other function signatures than ffcv 1.0.2's, "
                      "which fastneg's FFCV loader calls: pip install 'fastneg[ffcv]'")
llvm.load_library_permanently(ffcv._libffcv.__file__)
_U32 = types.uint32
_IMDECODE = types.ExternalFunction("imdecode", types.intc(
    types.voidptr, types.uint64, _U32, _U32,                # JPEG bytes, their size, h, w
    types.voidptr, _U32, _U32, _U32, _U32, _U32, _U32,      # output, crop h, w, x, y, scale
    types.boolean, types.boolean))                          # crop, flip
_RESIZE = types.ExternalFunction("resize", types.void(
    *[types.int64] * 11))    # 0, src, src h, w, row0, row1, col0, col1, dst, dst h, w


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at `address`, read when the compiled code runs."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.PointerType(ir.IntType(64))))
    return types.int64(types.intp), codegen


class DecodeOnceCrops(Operation):
    """FFCV decoder: one decode per image, `views` resized crops of it, view-major output.

    FFCV compiles this stage once per Loader and passes it only batch indices; the epoch, which
    the crop boxes depend on, is read at run time from `epoch_cell` (a one-element int64 array
    owned by the Loader) through its address, so set_epoch needs no recompilation.
    """

    def __init__(self, cfg: LoaderConfig, epoch_cell: np.ndarray):
        super().__init__()
        self.cfg, self.epoch_cell = cfg, epoch_cell

    def declare_state_and_memory(self, previous_state):
        shape = (self.cfg.views, self.cfg.size, self.cfg.size, 3)
        # A decode buffer per sample for the largest stored image, as FFCV's own decoders do.
        scratch = int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3
        u8 = np.dtype("u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((scratch,), u8)))

    def generate_code(self):
        cfg = self.cfg
        threads = Compiler.num_threads
        n_views, size, seed = cfg.views, cfg.size, cfg.seed
        center = cfg.scale is None
        scale_lo, scale_hi = (0.0, 0.0) if center else cfg.scale
        logr_lo, logr_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        slot0 = view_slot(0)
        slots_per_view = view_slot(1) - slot0
        epoch_address = self.epoch_cell.ctypes.data

        # FFCV compiles this small function in every process; the work is in _decode_crops,
        # which loads from Numba's cache.
        def decode(batch_indices, buffers, metadata, storage_state):
            destination, scratch = buffers
            n = len(batch_indices)
            # The slot's [n, views, ...] memory, read as [views, n, ...]: contiguous views.
            out = destination.reshape(-1)[:n_views * n * size * size * 3].reshape(
                (n_views, n, size, size, 3))
            numba.set_num_threads(threads)      # this (FFCV's) thread's share of the cores
            _decode_crops(batch_indices, out, scratch, metadata, storage_state,
                          _load_int64(epoch_address), seed, center, scale_lo, scale_hi,
                          logr_lo, logr_hi, slot0, slots_per_view)
            return out

        decode.is_parallel = False     # the parallel loop is _decode_crops's
        return decode


@numba.njit(inline="always")
def _stored_bytes(storage_state, address):
    """The bytes a field stored at `address` (FFCV's OS-cache memory manager's state: the
    memory-mapped file, the sorted start addresses and their sizes)."""
    mmap, ptrs, sizes = storage_state
    return mmap[address:address + sizes[np.searchsorted(ptrs, address)]]


@cached_njit(parallel=True, depends=(common,))
def _decode_crops(batch_indices, out, scratch, metadata, storage_state, epoch, seed, center,
                  scale_lo, scale_hi, logr_lo, logr_hi, slot0, slots_per_view):
    """Decode each sample's JPEG once into scratch[k], crop and resize out[v, k] per view."""
    n_views, size = out.shape[0], out.shape[2]
    for k in numba.prange(len(batch_indices)):
        sample = np.int64(batch_indices[k])
        field = metadata[sample]
        h, w = np.int64(field["height"]), np.int64(field["width"])
        jpeg = _stored_bytes(storage_state, field["data_ptr"])
        pixels = scratch[k][:h * w * 3].reshape((h, w, 3))
        _IMDECODE(jpeg.ctypes.data, jpeg.size, h, w, pixels.ctypes.data, h, w, 0, 0, 1, 1,
                  False, False)
        for v in range(n_views):
            if center:
                top, left, ch, cw = center_box_cpu(h, w, size)
            else:
                top, left, ch, cw = rrc_box_cpu(seed, epoch, sample, slot0 + v * slots_per_view,
                                                h, w, scale_lo, scale_hi, logr_lo, logr_hi)
            _RESIZE(0, pixels.ctypes.data, h, w, top, top + ch, left, left + cw,
                    out[v, k].ctypes.data, size, size)


class TextureCrops(Operation):
    """FFCV decoder of the texture field: decode, crop (texture_params' box), resize, flip.

    Reads the epoch like DecodeOnceCrops. Output uint8 [N, size, size, 3].
    """

    def __init__(self, cfg: LoaderConfig, epoch_cell: np.ndarray, bank_size: int):
        super().__init__()
        self.cfg, self.epoch_cell, self.bank_size = cfg, epoch_cell, bank_size

    def declare_state_and_memory(self, previous_state):
        shape = (self.cfg.size, self.cfg.size, 3)
        u8 = np.dtype("u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((self.bank_size ** 2 * 3,), u8)))

    def generate_code(self):
        threads = Compiler.num_threads
        seed, side = self.cfg.seed, self.bank_size
        scale_lo, scale_hi = TEXTURE_SCALE
        logr_lo, logr_hi = math.log(TEXTURE_RATIO[0]), math.log(TEXTURE_RATIO[1])
        epoch_address = self.epoch_cell.ctypes.data

        def decode(batch_indices, buffers, metadata, storage_state):
            destination, scratch = buffers
            n = len(batch_indices)
            numba.set_num_threads(threads)
            _decode_textures(batch_indices, destination[:n], scratch, metadata, storage_state,
                             _load_int64(epoch_address), seed, side, scale_lo, scale_hi,
                             logr_lo, logr_hi)
            return destination[:n]

        decode.is_parallel = False     # the parallel loop is _decode_textures's
        return decode


@cached_njit(parallel=True)
def _decode_textures(batch_indices, out, scratch, metadata, storage_state, epoch, seed, side,
                     scale_lo, scale_hi, logr_lo, logr_hi):
    """Decode each sample's side x side texture JPEG, crop, resize into out[k], flip."""
    size = out.shape[1]
    for k in numba.prange(len(batch_indices)):
        sample = np.int64(batch_indices[k])
        jpeg = _stored_bytes(storage_state, metadata[sample]["ptr"])
        pixels = scratch[k][:side * side * 3].reshape((side, side, 3))
        _IMDECODE(jpeg.ctypes.data, jpeg.size, side, side, pixels.ctypes.data, side, side, 0, 0,
                  1, 1, False, False)
        p = np.empty(PARAMS, np.int32)
        _draw_params_cpu(seed, epoch, sample, side, side, scale_lo, scale_hi, logr_lo, logr_hi,
                         p)
        image = out[k]
        _RESIZE(0, pixels.ctypes.data, side, side, p[0], p[0] + p[2], p[1], p[1] + p[3],
                image.ctypes.data, size, size)
        if p[4] == 1:
            for y in range(size):
                for x in range(size // 2):
                    for c in range(3):
                        t = image[y, x, c]
                        image[y, x, c] = image[y, size - 1 - x, c]
                        image[y, size - 1 - x, c] = t


class _ReportingEpochIterator(EpochIterator):
    """FFCV's epoch iterator, except that an error in its thread reaches the consumer.

    Upstream, an exception in the loading thread (a compile error, a bad sample) kills the
    thread and leaves the consumer waiting on the queue forever.
    """

    error: BaseException | None = None

    def run(self):
        try:
            streams = getattr(self, "cuda_streams", None)
            if streams and streams[0] is not None:
                # A new thread's current CUDA device is 0. FFCV's thread enters its streams'
                # device for each batch, and leaving restores device 0 by cudaSetDevice, which
                # makes a CUDA context on GPU 0 (every rank of a node, ~0.5 GB each): stay on
                # the device its streams were made on (the consumer's).
                torch.cuda.set_device(streams[0].device)
            super().run()
        except BaseException as e:   # noqa: BLE001 - handed to the consumer, re-raised there
            self.error = e
            self.output_queue.put(None)

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise RuntimeError(f"FFCV's loading thread failed: {self.error!r}") from self.error
            raise


def read_beton_info(path: Path) -> dict:
    """Check that `path` is a .beton of fastneg's layout and return its sidecar."""
    if not path.is_file():
        raise FileNotFoundError(f"FFCV dataset {path} does not exist (write one with "
                                "`fastneg convert --to ffcv DIR OUT.beton`)")
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0:
        raise ValueError(f"{path} is not a .beton (shorter than FFCV's header)")
    if header[0]["version"] != CURRENT_VERSION:
        raise ValueError(f"{path} has FFCV format version {header[0]['version']}, this FFCV "
                         f"reads version {CURRENT_VERSION}: convert the dataset again")
    try:
        reader = Reader(str(path))
    except Exception as e:   # noqa: BLE001 - FFCV fails in many ways on a foreign file
        raise ValueError(f"{path} is not a readable .beton ({e!r})") from e
    if tuple(reader.field_names) not in (convert.FIELDS, convert.FIELDS + (convert.TEXTURE_FIELD,)):
        raise ValueError(f"{path} has fields {reader.field_names}, fastneg's layout is "
                         f"{list(convert.FIELDS)} (+ {convert.TEXTURE_FIELD!r}): convert it with "
                         "`fastneg convert --to ffcv`")
    sidecar = convert.sidecar_path(path)
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{sidecar}, written next to {path.name} by `fastneg convert`, is "
                         f"missing or unreadable ({e})") from e
    if (info.get("layout"), info.get("version")) != (convert.LAYOUT, convert.LAYOUT_VERSION):
        raise ValueError(f"{path} has layout {info.get('layout')!r} version "
                         f"{info.get('version')!r}; this fastneg reads {convert.LAYOUT!r} "
                         f"version {convert.LAYOUT_VERSION}: convert the dataset again")
    labels, indices = reader.metadata["f1"], reader.metadata["f2"]
    if info.get("samples") != reader.num_samples or not np.array_equal(
            indices, np.arange(reader.num_samples)):
        raise ValueError(f"{path} does not match its sidecar {sidecar.name} "
                         "(sample count or index field): convert the dataset again")
    if not (reader.metadata["f0"]["mode"] == IMAGE_MODES["jpg"]).all():
        raise ValueError(f"{path} stores images other than as JPEG, which fastneg convert "
                         "never does: convert the dataset again")
    bad_in_file = set(np.flatnonzero(labels == convert.BAD_LABEL).tolist())
    if bad_in_file != {i for i, _, _ in info["bad"]}:
        raise ValueError(f"{path} and {sidecar.name} disagree on the unreadable samples: "
                         "convert the dataset again")
    info["labels"] = labels
    return info


class Loader(LoaderBase):
    kind = "ffcv"

    def __init__(self, data, cfg: LoaderConfig):
        path = Path(data)
        info = read_beton_info(path)
        bad = tuple((str(Path(info["source"]) / f), why) for _, f, why in info["bad"])
        if bad and not cfg.skip_bad:
            listed = "\n".join(f"  {f}: {why}" for f, why in bad[:5])
            raise ValueError(f"{path} holds {len(bad)} unreadable files (stored as skipped by "
                             f"`fastneg convert --skip-bad`):\n{listed}\npass skip_bad=True to "
                             "train without them")
        good = np.flatnonzero(info["labels"] != convert.BAD_LABEL).astype(np.int64)
        super().__init__(cfg, good, bad, tuple(info["classes"]))
        self._epoch_cell = np.zeros(1, np.int64)
        stored = info.get("texture_bank")
        self._textures = cfg.texture_bank is not None
        if self._textures and stored is None:
            raise ValueError(f"{path} holds no textures: convert it with `fastneg convert --to "
                             f"ffcv --texture-bank {cfg.texture_bank}` to use texture_bank")
        pipelines = {"image": PipelineSpec("image", decoder=DecodeOnceCrops(cfg,
                                                                            self._epoch_cell)),
                     "label": [IntDecoder()], "index": [IntDecoder()]}
        if stored is not None:
            pipelines[convert.TEXTURE_FIELD] = PipelineSpec(
                convert.TEXTURE_FIELD, decoder=TextureCrops(cfg, self._epoch_cell,
                                                            stored["size"])) \
                if self._textures else None
        self._ffcv = FfcvLoader(
            str(path), batch_size=cfg.batch_size, num_workers=max(1, cfg.workers),
            order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines,
            os_cache=True)     # the memory manager whose state the decode kernels read
        self._copy_stream = torch.cuda.Stream(cfg.device) if cfg.device.type == "cuda" else None

    def _batches(self, epoch, samples):
        self._epoch_cell[0] = epoch
        iterator = _ReportingEpochIterator(self._ffcv, samples.astype(np.uint64))
        copied = None     # the CUDA event after the last batch's copies
        try:
            while True:
                if copied is not None:
                    # Taking the next batch lets FFCV's thread refill the slot just copied
                    # from: the copies must be done first (module docstring).
                    copied.synchronize()
                try:
                    out = next(iterator)
                except StopIteration:
                    return
                batch, copied = self._move(out)
                yield batch
        finally:
            iterator.close()

    def _move(self, out) -> tuple[Batch, torch.cuda.Event | None]:
        """The batch out of FFCV's reused buffers: cloned on the CPU; on a GPU copied on the
        copy stream, which the consumer's stream waits for (returned: the copies' event)."""
        views, labels, indices = (torch.from_numpy(a) for a in out[:3])
        parts = [views[v] for v in range(views.shape[0])] + [labels[:, 0], indices[:, 0]]
        if self._textures:
            parts.append(torch.from_numpy(out[3]))
        event = None
        if self._copy_stream is None:
            parts = [t.clone() for t in parts]
        else:
            dev = self.cfg.device
            consumer = torch.cuda.current_stream(dev)
            with torch.cuda.stream(self._copy_stream):
                parts = [t.to(dev, non_blocking=True) for t in parts]
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            consumer.wait_event(event)
            for t in parts:
                t.record_stream(consumer)
        n = self.cfg.views
        return Batch(tuple(parts[:n]), parts[n], parts[n + 1],
                     parts[n + 2] if self._textures else None), event
