"""The DALI backend.

Reads an ImageFolder (JPEG and PNG by content). One graph for both devices, built once per
Loader:

    external_source (file bytes in fastneg's order, dataset indices, one crop window per view;
                    with a texture bank also the textures' JPEG bytes, crop windows and flips),
                    a batch at a time; with a GPU by DALI's Python worker processes (parallel),
                    ahead of the pipeline, so file reads overlap decoding and training
      -> decoders.image   device "mixed" on a GPU (nvJPEG, and the hardware JPEG decoder where
                          the GPU has one), "cpu" with device_id=None otherwise; once per sample
      -> resize(roi = the view's window, size x size)   per view, from the one decoded image
      -> textures: decoders.image (same device) -> resize(roi) -> flip

The order, the shards and the crop windows come from fastneg (loaders.common), not from DALI's
reader or its RNG, so a sample gets the same windows on every backend. Texture crops and flips:
loaders.common.texture_params, keyed by (seed, epoch, dataset index). Resize: DALI's linear
filter with antialiasing. Outputs reach torch through DALIGenericIterator; with DALI's dynamic
executor that is DLPack, no copy. On a GPU the dataset indices leave the pipeline on the device
and the labels are looked up in a table kept there.

Epochs without rebuilding: the parent writes each epoch's batches (dataset indices) into a small
file-backed shared table (_EpochTable), keyed by DALI's own epoch counter, before the epoch's
first batch is scheduled; the workers read it (BatchInfo.epoch_idx says which slot). The
pipeline is rebuilt only when an epoch is left before its end (DALI cannot reset mid-epoch) or
after a decode error (which ends a DALI pipeline); a file that failed once is left out of every
later batch, so it costs one rebuild per Loader, not one per epoch.
Worker processes read the files with a GPU only, started by spawn (fork after CUDA, or from a
process with threads, is unsafe); on the CPU the callback runs in the pipeline's own thread.
"""
from __future__ import annotations

import atexit
import gc
import os
import tempfile
import weakref

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderBase, LoaderConfig, crop_boxes, texture_params

HEADER = 4            # per slot: DALI epoch, loader epoch, batches, samples
MAX_PY_WORKERS = 4    # file reading is I/O: a few processes keep up with the decoder
_LIVE = weakref.WeakSet()   # this process's Loaders, whose pipelines end before its exit


@atexit.register
def _end_pipelines() -> None:
    """Drop every live Loader's pipeline while the interpreter is still whole: a DALI Pipeline
    left to the end of interpreter shutdown runs its __del__ after the modules it needs are
    gone, and prints "Exception ignored in Pipeline.__del__ ... TypeError" for each one."""
    for loader in list(_LIVE):
        loader._drop_pipeline()
    gc.collect()


class _EpochTable:
    """Two slots (DALI epochs alternate between them) of an epoch's batches, in a file mapped
    by the parent (read-write) and by DALI's workers (read-only). Picklable: workers reopen
    the file by path."""

    def __init__(self, samples: int, batches: int):
        fd, self.path = tempfile.mkstemp(prefix="fastneg-dali-", suffix=".i8")
        os.close(fd)
        self.shape = (2, HEADER + batches + 1 + samples)
        self.batches = batches
        self._table = np.memmap(self.path, np.int64, mode="w+", shape=self.shape)
        self._table[:, 0] = -1

    def __getstate__(self):
        return {**self.__dict__, "_table": None}

    def _open(self):
        if self._table is None:
            self._table = np.memmap(self.path, np.int64, mode="r", shape=self.shape)
        return self._table

    def write(self, dali_epoch: int, epoch: int, batches: list[np.ndarray]) -> None:
        slot = self._open()[dali_epoch % 2]
        offsets = np.zeros(len(batches) + 1, np.int64)
        offsets[1:] = np.cumsum([len(b) for b in batches])
        slot[HEADER:HEADER + len(offsets)] = offsets
        start = HEADER + self.batches + 1
        if batches:
            slot[start:start + offsets[-1]] = np.concatenate(batches)
        slot[1:4] = epoch, len(batches), offsets[-1]
        slot[0] = dali_epoch              # last: the slot is complete

    def read(self, dali_epoch: int, iteration: int) -> tuple[int, np.ndarray] | None:
        """(loader epoch, dataset indices) of batch `iteration`, or None past the end."""
        slot = self._open()[dali_epoch % 2]
        if slot[0] != dali_epoch or iteration >= slot[2]:
            return None
        a, b = slot[HEADER + iteration], slot[HEADER + iteration + 1]
        start = HEADER + self.batches + 1
        return int(slot[1]), np.array(slot[start + a:start + b])

    def remove(self) -> None:
        self._table = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _BatchSource:
    """The parallel external_source callback: one batch's inputs from a BatchInfo (stateless
    apart from lazily opened files, as DALI's parallel mode requires)."""

    def __init__(self, paths, heights, widths, cfg: LoaderConfig, table: _EpochTable, bank):
        self.paths, self.heights, self.widths, self.cfg = paths, heights, widths, cfg
        self.table, self.bank = table, bank

    def __call__(self, info):
        entry = self.table.read(info.epoch_idx, info.iteration)
        if entry is None:
            raise StopIteration
        epoch, idx = entry
        encoded = [np.fromfile(self.paths[i], np.uint8) for i in idx.tolist()]
        windows = []
        for v in range(self.cfg.views):
            boxes = crop_boxes(self.cfg, epoch, idx, self.heights[idx], self.widths[idx], v)
            windows += _window(boxes)
        if self.bank is None:
            return (encoded, idx, *windows)
        textures = [self.bank.encoded(r) for r in self.bank.rows_for(idx).tolist()]
        params = texture_params(self.cfg.seed, epoch, idx, self.bank.size)
        return (encoded, idx, *windows, textures, *_window(params[:, :4]),
                params[:, 4].astype(np.int32))


def _window(boxes: np.ndarray) -> list[np.ndarray]:
    """(top, left, height, width) rows -> DALI's absolute roi_start, roi_end as (y, x) floats."""
    start = boxes[:, :2].astype(np.float32)
    return [start, start + boxes[:, 2:4].astype(np.float32)]


class Loader(LoaderBase):
    kind = "dali"

    def __init__(self, data, cfg: LoaderConfig):
        check, self._paths, self._bank = self._init_from_folder(data, cfg)
        self._heights, self._widths = check.heights, check.widths
        self._on_gpu = cfg.device.type == "cuda"
        # looked up on the device
        self._labels = torch.from_numpy(check.images.labels).to(cfg.device)
        crop_boxes(cfg, 0, check.good[:1], check.heights[:1], check.widths[:1], 0)  # compile now
        self._table = _EpochTable(len(check.good), len(self) + 1)
        weakref.finalize(self, self._table.remove)
        self._outputs = None       # the DALIGenericIterator of the current pipeline
        self._dali_epoch = 0       # DALI's epoch counter of the current pipeline
        self._fresh = False        # the current pipeline has not run an epoch yet
        self.builds = 0            # pipelines built so far (one unless an epoch was cut short)
        _LIVE.add(self)

    # ------------------------------------------------------------- the pipeline

    # int64 outputs of the source passed through to the batch as they are (a subclass's)
    _passthrough: tuple[str, ...] = ()

    def _names(self) -> list[str]:
        return [f"view{v}" for v in range(self.cfg.views)] + ["indices"] + \
            (["textures"] if self._bank is not None else []) + list(self._passthrough)

    def _source(self):
        """(external_source callback, whether it may run in worker processes)."""
        return _BatchSource(self._paths, self._heights, self._widths, self.cfg, self._table,
                            self._bank), True

    def _build(self) -> None:
        cfg = self.cfg
        source, parallel_ok = self._source()
        extra = len(self._passthrough)
        py_workers = max(1, min(MAX_PY_WORKERS, cfg.workers))
        device = "mixed" if self._on_gpu else "cpu"
        with_bank = self._bank is not None

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                      device_id=cfg.device.index if self._on_gpu else None, exec_dynamic=True,
                      py_num_workers=py_workers,
                      py_start_method="spawn")
        def graph():
            outputs = 2 + 2 * cfg.views + (4 if with_bank else 0) + extra
            dtypes = [types.UINT8, types.INT64] + [types.FLOAT] * (2 * cfg.views)
            if with_bank:
                dtypes += [types.UINT8, types.FLOAT, types.FLOAT, types.INT32]
            dtypes += [types.INT64] * extra
            # Worker processes only with a GPU (spawned): on the CPU the reads are small next to
            # the decode, and workers forked from a process with threads (torch's, another
            # pipeline's) can deadlock and then hang the parent's exit.
            parallel = {"parallel": True, "prefetch_queue_depth": max(2, py_workers)} \
                if self._on_gpu and parallel_ok else {"parallel": False}
            encoded, indices, *rest = fn.external_source(
                source=source, num_outputs=outputs, batch=True, batch_info=True, dtype=dtypes,
                **parallel)
            windows = rest[:2 * cfg.views]
            # No EXIF rotation, like torchvision and PIL: the header's size is the pixel size.
            decoded = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                                        adjust_orientation=False)
            views = [fn.resize(decoded, roi_start=windows[2 * v], roi_end=windows[2 * v + 1],
                               roi_relative=False, size=[cfg.size, cfg.size], antialias=True,
                               interp_type=types.INTERP_LINEAR)
                     for v in range(cfg.views)]
            result = (*views, indices.gpu() if self._on_gpu else indices)
            if with_bank:
                tex_encoded, tex_start, tex_end, tex_flip = rest[2 * cfg.views:2 * cfg.views + 4]
                tex = fn.decoders.image(tex_encoded, device=device, output_type=types.RGB)
                tex = fn.resize(tex, roi_start=tex_start, roi_end=tex_end, roi_relative=False,
                                size=[cfg.size, cfg.size], antialias=True,
                                interp_type=types.INTERP_LINEAR)
                result += (fn.flip(tex, horizontal=tex_flip),)
            if extra:
                result += tuple(x.gpu() if self._on_gpu else x for x in rest[-extra:])
            return result

        pipe = graph()
        pipe.build()
        self._outputs = DALIGenericIterator(pipe, self._names(), prepare_first_batch=False)
        self._dali_epoch, self._fresh = 0, True
        self.builds += 1

    def _start(self, epoch: int, batches: list[np.ndarray]) -> None:
        """Make the pipeline's next DALI epoch yield `batches` (all non-empty)."""
        if self._outputs is None:
            self._build()
        elif not self._fresh:
            self._dali_epoch += 1      # DALI counts an epoch at each reset
        self._table.write(self._dali_epoch, epoch, batches)
        if not self._fresh:
            self._outputs.reset()
        self._fresh = False

    def _drop_pipeline(self) -> None:
        self._outputs = None           # its workers end with it

    # ------------------------------------------------------------- batches

    def _batches(self, epoch, samples):
        bs, dev, cfg = self.cfg.batch_size, self.cfg.device, self.cfg
        plan = [samples[s:s + bs] for s in range(0, len(samples), bs)]
        names = self._names()
        b = 0
        while b < len(plan):
            if self._failed:   # files that failed: replaced from this rank's shard (same size)
                plan = [self.refill(epoch, k) for k in range(len(plan))]
            if len(plan[b]) == 0:     # every file of the batch failed: keep the batch count
                empty = torch.empty((0, cfg.size, cfg.size, 3), dtype=torch.uint8, device=dev)
                none = torch.empty(0, dtype=torch.int64, device=dev)
                yield Batch((empty,) * cfg.views, none, none,
                            empty if self._bank is not None else None)
                b += 1
                continue
            # The pipeline's epoch: the non-empty batches from b on (an empty one ends it early;
            # the loop above yields it and starts the next part).
            stop = next((k for k in range(b, len(plan)) if len(plan[k]) == 0), len(plan))
            self._start(epoch, plan[b:stop])
            finished = False
            try:
                while True:
                    # next(), not a for loop: a suspended generator then holds the pipeline only
                    # through self._outputs, which _end_pipelines can drop at exit
                    try:
                        out = next(self._outputs)[0]
                    except StopIteration:
                        break
                    indices = out["indices"]
                    yield Batch(tuple(out[n] for n in names[:cfg.views]), self._labels[indices],
                                indices, out.get("textures"))
                    b += 1
                finished = True
            except RuntimeError as e:
                self._drop_pipeline()
                failures = self._failing_files(np.concatenate(plan[b:b + 3]))
                if not failures:
                    raise RuntimeError(f"DALI failed on batch {b} of epoch {epoch}, whose files "
                                       f"PIL decodes: {e}") from e
                failed = {f for f, _ in failures}
                batch_indices = np.concatenate(plan[b:b + 3]).tolist()
                self.skip_or_raise(failures, [i for i in batch_indices
                                              if self._paths[i] in failed])
            finally:
                if not finished and self._outputs is not None:
                    # Left before the end (the consumer stopped): DALI cannot reset mid-epoch.
                    self._drop_pipeline()

    def _failing_files(self, idx: np.ndarray) -> list[tuple[str, str]]:
        """The files of a batch that DALI failed on, found by decoding each with PIL."""
        from PIL import Image

        failures = []
        for i in idx.tolist():
            try:
                with Image.open(self._paths[i]) as im:
                    im.load()
            except Exception as e:   # noqa: BLE001 - any failure names the file
                failures.append((self._paths[i], f"cannot be decoded ({e})"))
        return failures
