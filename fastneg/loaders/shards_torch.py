"""The plain PyTorch backend over tar shards (fastneg.data.shards; plan and rules:
fastneg.loaders.shards).

The main process reads this rank's shards as one sequential stream (Python's tarfile in
streaming mode: local files, pipe: commands, URLs) and hands each batch's encoded images,
labels and sizes to the DataLoader's workers, which decode and crop exactly as the ImageFolder
path does (fastneg.loaders.torch_loader: same decoders, same crop windows for the same dataset
index, same device-decode path on a GPU). Reading a tar is cheap next to decoding it, so one
reader feeds the workers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderConfig, crop_boxes
from fastneg.loaders.shards import ShardLoaderBase, take
from fastneg.loaders.torch_loader import Loader, _as_is, _BatchReader, _decode_cpu

JPEG_SOI = b"\xff\xd8"


class _Requests(Sampler):
    """Yields this rank's batches of the current epoch as requests (epoch, indices, encoded
    images, labels, heights, widths, names), read from the loader's stream."""

    def __init__(self, loader: "ShardLoader"):
        self.loader = loader
        self.epoch, self.stream = 0, None

    def __iter__(self):
        for _ in range(len(self)):
            yield self.loader.request(self.epoch, take(self.stream, self.loader.cfg.batch_size))

    def __len__(self):
        return len(self.loader)


class _ShardReader(_BatchReader):
    """What a worker does with one request: _BatchReader's work on bytes that came with it."""

    def __init__(self, cfg: LoaderConfig, decode_on_device: bool, bank, info):
        self.cfg, self.decode_on_device, self.bank = cfg, decode_on_device, bank
        self.paths = info            # index -> "SHARD:KEY" (messages of the device path)
        self.info = info

    def __len__(self):
        return 0

    def boxes(self, epoch: int, idx: np.ndarray, heights=None, widths=None) -> list[np.ndarray]:
        if heights is None:          # the device path, in the main process
            heights, widths = self.info.sizes(idx)
        return [crop_boxes(self.cfg, epoch, idx, heights, widths, v)
                for v in range(self.cfg.views)]

    def __getitem__(self, request):
        """(views or per-image items, labels, indices, decode failures, textures) of a batch."""
        epoch, idx, encoded, labels, heights, widths, names = request
        items, failures, kept = [], [], []
        for k, data in enumerate(encoded):
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            try:
                if self.decode_on_device and data[:2] == JPEG_SOI:
                    items.append(tensor)              # raw bytes for nvJPEG
                else:
                    items.append(_decode_cpu(tensor))
                kept.append(k)
            except RuntimeError as e:
                failures.append((names[k], f"cannot be decoded ({e})"))
        idx, heights, widths = idx[kept], heights[kept], widths[kept]
        return self.batch(epoch, items, idx, labels[kept], failures,
                          lambda: self.boxes(epoch, idx, heights, widths))


class ShardLoader(ShardLoaderBase, Loader):
    """build_loader("torch", SHARDS): Loader's contract over tar shards.

    device_decode as in torch_loader.Loader. A file that fails to decode (skip_bad) is replaced
    by the next samples of the rank's stream, decoded in the main process, so the batch keeps
    its size (on the device path, as for folders, the batch is shorter instead).
    """
    kind = "torch"

    def __init__(self, data, cfg: LoaderConfig, device_decode: bool | None = None):
        self._init_shards(data, cfg)
        self._device_decode = cfg.device.type == "cuda" if device_decode is None else device_decode
        self._reader = _ShardReader(cfg, self._device_decode, self._bank, self._info)
        self._reader.boxes(0, np.zeros(1, np.int64), np.ones(1, np.int64),
                           np.ones(1, np.int64))   # compile before workers fork
        self._requests = _Requests(self)
        self._loader = DataLoader(
            self._reader, sampler=self._requests, batch_size=None, collate_fn=_as_is,
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=cfg.device.type == "cuda")

    def request(self, epoch: int, samples) -> tuple:
        self._info.add(samples)
        return (epoch, np.array([s.index for s in samples], np.int64),
                [s.data for s in samples], np.array([s.label for s in samples], np.int64),
                np.array([s.height for s in samples], np.int64),
                np.array([s.width for s in samples], np.int64), [s.where for s in samples])

    def _batches(self, epoch, samples=None):
        stream = self.plan.stream(epoch)
        self._requests.epoch, self._requests.stream = epoch, stream
        try:
            if not self._device_decode:
                for views, labels, indices, failures, textures in self._loader:
                    while failures:
                        self.skip_or_raise(failures)
                        views, labels, indices, textures, failures = self._fill(
                            epoch, stream, views, labels, indices, textures)
                    yield Batch(tuple(views.unbind(0)), labels, indices, textures)
                return
            yield from self._device_batches(epoch)
        finally:
            stream.close()

    def _fill(self, epoch, stream, views, labels, indices, textures):
        """The batch topped up to batch_size from the stream (its decode failures, if any, come
        back for another round)."""
        more = self._reader[self.request(epoch, take(stream, self.cfg.batch_size - len(labels)))]
        more_views, more_labels, more_indices, failures, more_textures = more
        views = torch.cat([views, more_views], 1)
        labels, indices = torch.cat([labels, more_labels]), torch.cat([indices, more_indices])
        if textures is not None:
            textures = torch.cat([textures, more_textures])
        return views, labels, indices, textures, failures
