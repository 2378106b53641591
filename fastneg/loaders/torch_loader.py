"""The plain PyTorch backend: needs neither DALI nor FFCV.

Reads an ImageFolder (JPEG and PNG by content). Each DataLoader worker handles a whole batch:
- device "cpu": read, decode (torchvision.io.decode_image, libjpeg-turbo / libpng) and crop in the
  worker; the batch arrives ready.
- device "cuda": the worker only reads file bytes; the main process decodes the batch's JPEGs at
  once with nvJPEG (torchvision.io.decode_jpeg(list, device="cuda")) and crops on the GPU. CMYK
  JPEGs and PNGs, which nvJPEG does not take, are decoded in the worker and copied over.
Crop: the box from fastneg's RNG (same as DALI and FFCV), then
torchvision.transforms.v2.functional.resized_crop: bilinear with antialiasing, on uint8.

The epoch travels with each batch request (the sampler yields (epoch, indices)), so persistent
workers never need to be told about set_epoch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resized_crop

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderBase, LoaderConfig, checked_image_folder, crop_boxes


def _read(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def _decode_cpu(path: str) -> torch.Tensor:
    """uint8 [3, H, W] RGB (grayscale, CMYK and palette images converted as PIL does)."""
    return decode_image(_read(path), mode=ImageReadMode.RGB)


def _decode_jpeg_gpu(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Batched nvJPEG decode, the one call site (torchvision plans to move it to TorchCodec)."""
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _crop_into(views: torch.Tensor, images, boxes: list[np.ndarray], size: int) -> None:
    """views[v, k] = image k cropped to boxes[v][k] and resized to size x size, as HWC."""
    for v, view_boxes in enumerate(boxes):
        for k, (img, (top, left, h, w)) in enumerate(zip(images, view_boxes.tolist())):
            views[v, k] = resized_crop(img, top, left, h, w, [size, size],
                                       antialias=True).permute(1, 2, 0)


class _EpochPlan(Sampler):
    """Yields this rank's batches of the current epoch as (epoch, dataset indices)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.epoch = 0
        self.samples = np.empty(0, np.int64)

    def __iter__(self):
        for start in range(0, len(self.samples), self.batch_size):
            yield self.epoch, self.samples[start:start + self.batch_size]

    def __len__(self):
        return -(-len(self.samples) // self.batch_size)


class _BatchReader(Dataset):
    """What a worker does with one (epoch, indices) request."""

    def __init__(self, paths, labels, heights, widths, jpeg_rgb, cfg: LoaderConfig,
                 decode_on_gpu: bool):
        self.paths, self.labels = paths, labels
        self.heights, self.widths, self.jpeg_rgb = heights, widths, jpeg_rgb
        self.cfg, self.decode_on_gpu = cfg, decode_on_gpu

    def __len__(self):
        return len(self.paths)

    def boxes(self, epoch: int, idx: np.ndarray) -> list[np.ndarray]:
        return [crop_boxes(self.cfg, epoch, idx, self.heights[idx], self.widths[idx], v)
                for v in range(self.cfg.views)]

    def __getitem__(self, request):
        """(views or per-image items, labels, indices, decode failures) of one batch.

        Decode failures are returned, not raised, so the main process applies skip_bad.
        """
        epoch, idx = request
        items, failures, kept = [], [], []
        for k, i in enumerate(idx.tolist()):
            try:
                if self.decode_on_gpu and self.jpeg_rgb[i]:
                    items.append(_read(self.paths[i]))      # raw bytes for nvJPEG
                else:
                    items.append(_decode_cpu(self.paths[i]))
                kept.append(k)
            except RuntimeError as e:     # torchvision's decode errors
                failures.append((self.paths[i], f"cannot be decoded ({e})"))
        idx = idx[kept]
        labels, indices = torch.from_numpy(self.labels[idx]), torch.from_numpy(idx)
        if self.decode_on_gpu:
            return items, labels, indices, failures
        views = torch.empty((self.cfg.views, len(idx), self.cfg.size, self.cfg.size, 3),
                            dtype=torch.uint8)
        _crop_into(views, items, self.boxes(epoch, idx), self.cfg.size)
        return views, labels, indices, failures


def _as_is(item):
    return item


class Loader(LoaderBase):
    kind = "torch"

    def __init__(self, data, cfg: LoaderConfig):
        check = checked_image_folder(data, cfg)
        images = check.images
        super().__init__(cfg, check.good, check.bad_files, images.classes)
        self._decode_on_gpu = cfg.device.type == "cuda"
        self._reader = _BatchReader([str(images.path(i)) for i in range(len(images))],
                                    images.labels, check.heights, check.widths, check.jpeg_rgb,
                                    cfg, self._decode_on_gpu)
        # Compile the box kernel here, once, so forked workers inherit it instead of compiling.
        self._reader.boxes(0, check.good[:1])
        self._plan = _EpochPlan(cfg.batch_size)
        self._loader = DataLoader(
            self._reader, sampler=self._plan, batch_size=None, collate_fn=_as_is,
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=self._decode_on_gpu)   # pinned bytes/pixels: asynchronous copies to the GPU

    def _batches(self, epoch, samples):
        self._plan.epoch, self._plan.samples = epoch, samples
        bs = self.cfg.batch_size
        for b, (item, labels, indices, failures) in enumerate(self._loader):
            if self._decode_on_gpu:
                item, labels, indices, more = self._decode_on_device(item, labels, indices)
                failures += more
            if failures:
                lost = set(samples[b * bs:(b + 1) * bs].tolist()) - set(indices.tolist())
                self.skip_or_raise(failures, lost)
                if not self._decode_on_gpu:   # nvJPEG failures: the batch stays short for now
                    item, labels, indices = self._refill(epoch, b, item, labels, indices)
            if self._decode_on_gpu:
                yield self._crop_on_device(epoch, item, labels, indices)
            else:
                yield Batch(tuple(item.unbind(0)), labels, indices)

    def _refill(self, epoch, b, views, labels, indices):
        """Batch `b` with its failed files replaced (LoaderBase.refill), decoded here, in the
        planned order: a decode failure does not shorten the batch."""
        while True:
            planned = self.refill(epoch, b)
            have = set(indices.tolist())
            missing = np.array([i for i in planned.tolist() if i not in have], np.int64)
            if not len(missing):
                break
            more_views, more_labels, more_indices, failures = self._reader[(epoch, missing)]
            self.skip_or_raise(failures, set(missing.tolist()) - set(more_indices.tolist()))
            views = torch.cat([views, more_views], 1)
            labels, indices = torch.cat([labels, more_labels]), torch.cat([indices, more_indices])
        position = {i: k for k, i in enumerate(planned.tolist())}
        keep = torch.tensor(sorted(range(len(indices)), key=lambda k: position.get(
            int(indices[k]), len(position)))[:len(planned)])
        return views[:, keep].contiguous(), labels[keep], indices[keep]

    def _decode_on_device(self, items, labels, indices):
        """Decode the batch's JPEG bytes with nvJPEG; move the images decoded by the worker."""
        dev = self.cfg.device
        encoded = [k for k, item in enumerate(items) if item.dim() == 1]
        images = [item.to(dev, non_blocking=True) if item.dim() == 3 else None for item in items]
        failures = []
        try:
            decoded = _decode_jpeg_gpu([items[k] for k in encoded], dev) if encoded else []
        except RuntimeError:
            # One bad file fails the batched call: decode one by one to find it.
            decoded = []
            for k in encoded:
                try:
                    decoded += _decode_jpeg_gpu([items[k]], dev)
                except RuntimeError as e:
                    decoded.append(None)
                    failures.append((self._reader.paths[int(indices[k])],
                                     f"cannot be decoded ({e})"))
        for k, img in zip(encoded, decoded):
            images[k] = img
        kept = [k for k, img in enumerate(images) if img is not None]
        if len(kept) < len(images):
            images, labels, indices = [images[k] for k in kept], labels[kept], indices[kept]
        return images, labels, indices, failures

    def _crop_on_device(self, epoch, images, labels, indices) -> Batch:
        dev, cfg = self.cfg.device, self.cfg
        views = torch.empty((cfg.views, len(images), cfg.size, cfg.size, 3), dtype=torch.uint8,
                            device=dev)
        _crop_into(views, images, self._reader.boxes(epoch, indices.numpy()), cfg.size)
        return Batch(tuple(views.unbind(0)), labels.to(dev, non_blocking=True),
                     indices.to(dev, non_blocking=True))
