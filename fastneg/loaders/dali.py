"""The DALI backend.

Reads an ImageFolder (JPEG and PNG by content). One graph for both devices:

    external_source (file bytes in fastneg's order, dataset indices, one crop window per view)
      -> decoders.image   device "mixed" on a GPU (nvJPEG, and the hardware JPEG decoder where
                          the GPU has one), "cpu" with device_id=None otherwise; once per sample
      -> resize(roi = the view's window, size x size)   per view, from the one decoded image

The order, the shards and the crop windows come from fastneg (loaders.common), not from DALI's
reader or its RNG, so a sample gets the same windows on every backend. Resize: DALI's linear
filter with antialiasing. Outputs reach torch through DALIGenericIterator; with DALI's dynamic
executor that is DLPack, no copy.
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderBase, LoaderConfig, checked_image_folder, crop_boxes


class _EpochSource:
    """external_source callback: batch `first + iteration` of the epoch's plan, or StopIteration."""

    def __init__(self, paths, heights, widths, cfg: LoaderConfig, epoch: int,
                 plan: list[np.ndarray], first: int):
        self.paths, self.heights, self.widths, self.cfg = paths, heights, widths, cfg
        self.epoch, self.plan, self.first = epoch, plan, first

    def __call__(self, info):
        if self.first + info.iteration >= len(self.plan):
            raise StopIteration
        idx = self.plan[self.first + info.iteration]
        encoded = [np.fromfile(self.paths[i], np.uint8) for i in idx.tolist()]
        windows = []
        for v in range(self.cfg.views):
            boxes = crop_boxes(self.cfg, self.epoch, idx, self.heights[idx], self.widths[idx], v)
            start = boxes[:, :2].astype(np.float32)             # (top, left): DALI's (y, x)
            windows += [start, start + boxes[:, 2:].astype(np.float32)]
        return (encoded, idx, *windows)


class Loader(LoaderBase):
    kind = "dali"

    def __init__(self, data, cfg: LoaderConfig):
        check = checked_image_folder(data, cfg)
        images = check.images
        super().__init__(cfg, check.good, check.bad_files, images.classes)
        self._paths = [str(images.path(i)) for i in range(len(images))]
        self._heights, self._widths = check.heights, check.widths
        self._labels = torch.from_numpy(images.labels)
        self._on_gpu = cfg.device.type == "cuda"
        crop_boxes(cfg, 0, check.good[:1], check.heights[:1], check.widths[:1], 0)  # compile now

    def _pipeline(self, source: _EpochSource):
        cfg = self.cfg

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                      device_id=cfg.device.index if self._on_gpu else None, exec_dynamic=True)
        def graph():
            encoded, indices, *windows = fn.external_source(
                source=source, num_outputs=2 + 2 * cfg.views, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64] + [types.FLOAT] * (2 * cfg.views))
            # No EXIF rotation, like torchvision and PIL: the header's size is the pixel size.
            decoded = fn.decoders.image(encoded, device="mixed" if self._on_gpu else "cpu",
                                        output_type=types.RGB, adjust_orientation=False)
            views = [fn.resize(decoded, roi_start=windows[2 * v], roi_end=windows[2 * v + 1],
                               roi_relative=False, size=[cfg.size, cfg.size], antialias=True,
                               interp_type=types.INTERP_LINEAR)
                     for v in range(cfg.views)]
            return (*views, indices)

        pipe = graph()
        pipe.build()
        return pipe

    def _batches(self, epoch, samples):
        bs, dev = self.cfg.batch_size, self.cfg.device
        plan = [samples[s:s + bs] for s in range(0, len(samples), bs)]
        names = [f"view{v}" for v in range(self.cfg.views)] + ["indices"]
        b = 0
        while b < len(plan):
            if len(plan[b]) == 0:     # every file of the batch failed: keep the batch count
                empty = torch.empty((0, self.cfg.size, self.cfg.size, 3), dtype=torch.uint8,
                                    device=dev)
                none = torch.empty(0, dtype=torch.int64, device=dev)
                yield Batch((empty,) * self.cfg.views, none, none)
                b += 1
                continue
            # A fresh pipeline per epoch (and after a decode failure, which ends a DALI
            # pipeline): its source is bound to this plan, and an epoch left early cannot leak
            # prefetched batches into the next one. Building one costs milliseconds.
            source = _EpochSource(self._paths, self._heights, self._widths, self.cfg, epoch,
                                  plan, b)
            outputs = DALIGenericIterator(self._pipeline(source), names, prepare_first_batch=False)
            try:
                for out in outputs:
                    indices = out[0]["indices"]
                    yield Batch(tuple(out[0][n] for n in names[:-1]),
                                self._labels[indices].to(dev, non_blocking=True),
                                indices.to(dev, non_blocking=True))
                    b += 1
            except RuntimeError as e:
                failures = self._failing_files(plan[b])
                if not failures:
                    raise RuntimeError(f"DALI failed on batch {b} of epoch {epoch}, whose files "
                                       f"PIL decodes: {e}") from e
                failed = {f for f, _ in failures}
                self.skip_or_raise(failures, [i for i in plan[b].tolist()
                                              if self._paths[i] in failed])
                plan[b] = self.refill(epoch, b)   # same size: replaced from this rank's shard

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
