"""The plain PyTorch backend: needs neither DALI nor FFCV.

Reads an ImageFolder (JPEG and PNG by content). Each DataLoader worker handles a whole batch:
- device "cpu": read, decode (torchvision.io.decode_image, libjpeg-turbo / libpng) and crop in the
  worker; the batch arrives ready.
- device "cuda": the worker only reads file bytes. A background thread of the main process takes
  the workers' batches, decodes each batch's JPEGs (the images and, with a texture bank, their
  textures) in one nvJPEG call (torchvision.io.decode_jpeg(list, device="cuda")) on a side CUDA
  stream, and crops all views of the batch at once (resized_crops: two batched matrix products);
  it keeps PREFETCH batches ready, and the training stream waits on each batch's CUDA event
  instead of the host syncing. CMYK JPEGs and PNGs, which nvJPEG does not take, are decoded in
  the worker and copied over; a JPEG that nvJPEG rejects is decoded again on the CPU
  (libjpeg-turbo) before it counts as unreadable.
Crop: the box from fastneg's RNG (same as DALI and FFCV), resized with a bilinear filter with
antialiasing on uint8 (torchvision's resized_crop in the CPU workers; the same filter as matrices
on the GPU, equal within rounding). Textures (texture_bank=): one random resized crop + flip per
texture from loaders.common.texture_params, resized the same way.

The epoch travels with each batch request (the sampler yields (epoch, indices)), so persistent
workers never need to be told about set_epoch.
"""
from __future__ import annotations

import io
import math
import queue
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resized_crop

from fastneg.loaders.batch import Batch
from fastneg.loaders.common import LoaderBase, LoaderConfig, crop_boxes, texture_params

PREFETCH = 2   # batches decoded ahead on the GPU path


def _read(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_cpu(encoded: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] RGB (grayscale, CMYK and palette images converted as PIL does); a file
    that cannot be decoded raises RuntimeError.

    PNGs are decoded by PIL: torchvision 0.29's PNG decoder kills the process (SIGSEGV) on some
    damaged files that pass the pre-flight check (header and IEND intact, image data broken)."""
    if bytes(encoded[:8].tolist()) == PNG_SIGNATURE:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:   # PIL's errors for broken data
            raise RuntimeError(f"PNG: {e}") from None
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    return decode_image(encoded, mode=ImageReadMode.RGB)


def _decode_jpeg_gpu(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Batched nvJPEG decode, the one call site (torchvision plans to move it to TorchCodec).

    torchvision allocates the outputs on the caller's current stream but writes them on a
    stream of its own, which waits for nothing of ours (its result is handed back with an
    event, so reading it is safe). A block that work still queued on the current stream has
    freed (the previous batch's crops) would be overwritten too early: wait for that stream on
    this (prefetch) thread first. It costs the consumer nothing; the prefetch runs ahead.
    """
    torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _crop_into(views: torch.Tensor, images, boxes: list[np.ndarray], size: int,
               flips=None) -> None:
    """views[v, k] = image k cropped to boxes[v][k] and resized to size x size, as HWC;
    flipped left-right where flips[k] (one view only)."""
    for v, view_boxes in enumerate(boxes):
        for k, (img, (top, left, h, w)) in enumerate(zip(images, view_boxes.tolist())):
            out = resized_crop(img, top, left, h, w, [size, size], antialias=True)
            if flips is not None and flips[k]:
                out = out.flip(-1)
            views[v, k] = out.permute(1, 2, 0)


# ----------------------------------------------------------------- batched crops

def _filter_taps(start, length, size):
    """Separable antialiased bilinear weights of one axis, for N crops at once.

    start, length: int64 [N] (the crop's first source pixel and extent). Returns (idx, w):
    int64 / float32 [N, size, K]: output pixel o of crop k is sum_t w[k, o, t] * src[idx[k, o, t]].
    The filter is the triangle of torch's antialiased bilinear resize (PIL's rule): support
    max(1, L / size) source pixels either side of the centre, weights normalized to sum 1.
    """
    scale = length / size                                     # float64 [N]
    support = np.maximum(scale, 1.0)
    inv = 1.0 / support
    taps = int(math.ceil(support.max())) * 2 + 1
    centre = scale[:, None] * (np.arange(size) + 0.5)[None, :]            # [N, size]
    lo = np.maximum((centre - support[:, None] + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support[:, None] + 0.5).astype(np.int64), length[:, None])
    j = np.arange(taps)
    src = lo[..., None] + j                                    # [N, size, K] within the crop
    w = np.maximum(0.0, 1.0 - np.abs((src - centre[..., None] + 0.5) * inv[:, None, None]))
    w = np.where(src < hi[..., None], w, 0.0)
    w /= w.sum(-1, keepdims=True)
    idx = np.minimum(src, length[:, None, None] - 1) + start[:, None, None]
    return idx, w.astype(np.float32)


def _dense(idx, w, extent, device):
    """[N, size, extent] float32 matrices from taps (one scatter on `device`)."""
    m = torch.zeros(idx.shape[:2] + (extent,), dtype=torch.float32, device=device)
    return m.scatter_add_(2, torch.from_numpy(idx).to(device), torch.from_numpy(w).to(device))


CROP_BUDGET = 512 << 20   # bytes of float pixels per padded group in resized_crops


def resized_crops(images: list[torch.Tensor], boxes: list[np.ndarray], size: int,
                  flips: np.ndarray | None = None) -> torch.Tensor:
    """uint8 [V, N, size, size, 3]: every view of every image, cropped and resized in one go.

    images: N uint8 [3, H_k, W_k] on one device; boxes: V int64 [N, 4] (top, left, height,
    width); flips (optional, bool [N]): mirror the output left-right. The resize is the
    antialiased bilinear filter of torchvision's resized_crop (to within one level of rounding)
    written as two batched matrix products over the zero-padded images: view = Y_k @ image_k @
    X_k^T, so a batch costs a fixed handful of kernels, not 2N resizes. Images are padded in
    groups of similar size (each group's float pixels within CROP_BUDGET), so one large photo
    does not pad the whole batch to its size. On a GPU the products run in float32, or TF32 when
    torch.backends.cuda.matmul.allow_tf32 is set (within a level).
    """
    device = images[0].device
    n, views = len(images), len(boxes)
    out = torch.empty((views, n, size, size, 3), dtype=torch.uint8, device=device)
    flips = np.zeros(n, bool) if flips is None else np.asarray(flips, bool)
    areas = np.array([int(img.shape[1]) * int(img.shape[2]) for img in images])
    group: list[int] = []
    h_max = w_max = 0
    for k in np.argsort(areas, kind="stable").tolist():
        h, w = int(images[k].shape[1]), int(images[k].shape[2])
        h2, w2 = max(h_max, h), max(w_max, w)
        if group and (len(group) + 1) * 12 * h2 * w2 > CROP_BUDGET:
            _crops_of_group(images, boxes, size, flips, group, h_max, w_max, out)
            group, h2, w2 = [], h, w
        group.append(k)
        h_max, w_max = h2, w2
    _crops_of_group(images, boxes, size, flips, group, h_max, w_max, out)
    return out


def _crops_of_group(images, boxes, size, flips, group, h_max, w_max, out) -> None:
    """out[:, group] = the crops of images[group], padded to h_max x w_max (resized_crops)."""
    device = out.device
    n, views = len(group), len(boxes)
    padded = torch.zeros((n, 3, h_max, w_max), dtype=torch.uint8, device=device)
    for j, k in enumerate(group):
        padded[j, :, :images[k].shape[1], :images[k].shape[2]] = images[k]
    all_boxes = np.concatenate([b[group] for b in boxes]).astype(np.int64)   # view-major
    yi, yw = _filter_taps(all_boxes[:, 0], all_boxes[:, 2], size)
    xi, xw = _filter_taps(all_boxes[:, 1], all_boxes[:, 3], size)
    flip = np.tile(flips[group], views)
    xi[flip], xw[flip] = xi[flip, ::-1], xw[flip, ::-1]
    rows = _dense(yi, yw, h_max, device).view(views, n, 1, size, h_max)
    cols = _dense(xi, xw, w_max, device).view(views, n, 1, size, w_max)
    pixels = padded.float().unsqueeze(0)                      # [1, n, 3, H, W]
    crops = torch.matmul(torch.matmul(rows, pixels), cols.transpose(-1, -2))  # [V, n, 3, s, s]
    crops = crops.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2)
    index = torch.as_tensor(group, device=device)
    for v in range(views):
        out[v].index_copy_(0, index, crops[v])


# ----------------------------------------------------------------- background prefetch

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


def prefetched(items, prepare, device: torch.device, depth: int = PREFETCH):
    """Yield prepare(item) for each item, computed `depth` items ahead on a background thread.

    On CUDA the thread works on its own stream and records an event after each item; the
    consumer's current stream waits on that event (no host sync) and every tensor of the result
    is marked as used by the consumer's stream, so the allocator does not hand its memory back
    to the side stream early. An exception in the thread is raised here; closing the generator
    early stops the thread.
    """
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            if cuda:
                # A new thread's current CUDA device is 0: set ours before `items` starts (a
                # DataLoader iterator made here gives its pin-memory thread this thread's
                # device; on device 0 every rank would make a context on GPU 0).
                torch.cuda.set_device(device)
            for item in items:
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(side):
                        result = prepare(item)
                        event = torch.cuda.Event()
                        event.record(side)
                else:
                    result, event = prepare(item), None
                if not put((result, event, None)):
                    return
            put((None, None, done))
        except BaseException as e:   # noqa: BLE001 - handed to the consumer, raised there
            put((None, None, e))

    thread = threading.Thread(target=work, name="fastneg-decode", daemon=True)
    thread.start()
    try:
        while True:
            result, event, end = ready.get()
            if end is done:
                return
            if end is not None:
                raise end
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                for t in _tensors(result):
                    if t.is_cuda:
                        t.record_stream(consumer)
            yield result
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------- the Dataset and Loader

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
                 decode_on_device: bool, bank=None):
        self.paths, self.labels = paths, labels
        self.heights, self.widths, self.jpeg_rgb = heights, widths, jpeg_rgb
        self.cfg, self.decode_on_device, self.bank = cfg, decode_on_device, bank

    def __len__(self):
        return len(self.paths)

    def boxes(self, epoch: int, idx: np.ndarray) -> list[np.ndarray]:
        return [crop_boxes(self.cfg, epoch, idx, self.heights[idx], self.widths[idx], v)
                for v in range(self.cfg.views)]

    def texture_boxes(self, epoch: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes int64 [N, 4], flips bool [N]) of the samples' texture crops."""
        params = texture_params(self.cfg.seed, epoch, idx, self.bank.size)
        return params[:, :4].astype(np.int64), params[:, 4] == 1

    def __getitem__(self, request):
        """(views or per-image items, labels, indices, decode failures, textures or their
        bytes or None) of one batch.

        Decode failures are returned, not raised, so the main process applies skip_bad.
        """
        epoch, idx = request
        items, failures, kept = [], [], []
        for k, i in enumerate(idx.tolist()):
            try:
                encoded = _read(self.paths[i])
                if self.decode_on_device and self.jpeg_rgb[i]:
                    items.append(encoded)                   # raw bytes for nvJPEG
                else:
                    items.append(_decode_cpu(encoded))
                kept.append(k)
            except RuntimeError as e:     # torchvision's decode errors
                failures.append((self.paths[i], f"cannot be decoded ({e})"))
        idx = idx[kept]
        return self.batch(epoch, items, idx, self.labels[idx], failures,
                          lambda: self.boxes(epoch, idx))

    def batch(self, epoch, items, idx, labels, failures, view_boxes):
        """The worker's result for the kept `items` (decoded images, or JPEG bytes for the
        device) of dataset indices `idx` with their `labels`: the textures' bytes fetched, and on
        the CPU path the views and textures cropped here. view_boxes() gives the views' boxes."""
        labels, indices = torch.from_numpy(labels), torch.from_numpy(idx)
        textures = None
        if self.bank is not None:
            textures = [torch.from_numpy(self.bank.encoded(r).copy())
                        for r in self.bank.rows_for(idx).tolist()]
        if self.decode_on_device:
            return items, labels, indices, failures, textures
        views = torch.empty((self.cfg.views, len(idx), self.cfg.size, self.cfg.size, 3),
                            dtype=torch.uint8)
        _crop_into(views, items, view_boxes(), self.cfg.size)
        if textures is not None:
            boxes, flips = self.texture_boxes(epoch, idx)
            out = torch.empty((1, len(idx), self.cfg.size, self.cfg.size, 3), dtype=torch.uint8)
            _crop_into(out, [decode_jpeg(t, mode=ImageReadMode.RGB) for t in textures], [boxes],
                       self.cfg.size, flips)
            textures = out[0]
        return views, labels, indices, failures, textures


def _as_is(item):
    return item


class Loader(LoaderBase):
    """device_decode (default: on a CUDA device) selects the decode-on-device path; True on the
    CPU runs that path with CPU tensors (for tests: the same code without a GPU)."""
    kind = "torch"

    def __init__(self, data, cfg: LoaderConfig, device_decode: bool | None = None):
        check, paths, bank = self._init_from_folder(data, cfg)
        self._device_decode = cfg.device.type == "cuda" if device_decode is None else device_decode
        self._reader = _BatchReader(paths, check.images.labels, check.heights, check.widths,
                                    check.jpeg_rgb, cfg, self._device_decode, bank)
        # Compile the box kernel here, once, so forked workers inherit it instead of compiling.
        self._reader.boxes(0, check.good[:1])
        self._plan = _EpochPlan(cfg.batch_size)
        self._loader = DataLoader(
            self._reader, sampler=self._plan, batch_size=None, collate_fn=_as_is,
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=cfg.device.type == "cuda")   # pinned: asynchronous copies to the GPU

    def _batches(self, epoch, samples):
        self._plan.epoch, self._plan.samples = epoch, samples
        bs = self.cfg.batch_size
        if not self._device_decode:
            for b, (views, labels, indices, failures, textures) in enumerate(self._loader):
                if failures:
                    lost = set(samples[b * bs:(b + 1) * bs].tolist()) - set(indices.tolist())
                    self.skip_or_raise(failures, lost)
                    views, labels, indices, textures = self._refill(epoch, b, views, labels,
                                                                    indices, textures)
                yield Batch(tuple(views.unbind(0)), labels, indices, textures)
            return
        yield from self._device_batches(epoch)

    def _device_batches(self, epoch):
        """The decode-on-device path's batches of `epoch`, decoded and cropped on the prefetch
        thread. A failure still shortens its batch (replacement: CPU decode only)."""
        prepare = lambda item: self._decode_and_crop(epoch, *item)   # noqa: E731
        for batch, failures in prefetched(self._loader, prepare, self.cfg.device):
            if failures:
                self.skip_or_raise(failures)
            yield batch

    def _refill(self, epoch, b, views, labels, indices, textures):
        """Batch `b` with its failed files replaced (LoaderBase.refill), decoded here, in the
        planned order: a decode failure does not shorten the batch."""
        while True:
            planned = self.refill(epoch, b)
            have = set(indices.tolist())
            missing = np.array([i for i in planned.tolist() if i not in have], np.int64)
            if not len(missing):
                break
            more_views, more_labels, more_indices, failures, more_textures = \
                self._reader[(epoch, missing)]
            self.skip_or_raise(failures, set(missing.tolist()) - set(more_indices.tolist()))
            views = torch.cat([views, more_views], 1)
            labels, indices = torch.cat([labels, more_labels]), torch.cat([indices, more_indices])
            if textures is not None:
                textures = torch.cat([textures, more_textures])
        position = {i: k for k, i in enumerate(planned.tolist())}
        keep = torch.tensor(sorted(range(len(indices)), key=lambda k: position.get(
            int(indices[k]), len(position)))[:len(planned)])
        textures = None if textures is None else textures[keep]
        return views[:, keep].contiguous(), labels[keep], indices[keep], textures

    def _decode_and_crop(self, epoch, items, labels, indices, failures, textures):
        """The device path, on the prefetch thread: (Batch, decode failures)."""
        images, textures, labels, indices, more = self._decode_on_device(items, labels, indices,
                                                                         textures)
        return self._crop_on_device(epoch, images, textures, labels, indices), failures + more

    def _decode_on_device(self, items, labels, indices, textures):
        """Decode the batch's JPEG bytes (images, then textures) in one nvJPEG call; move the
        images decoded by the worker. A JPEG nvJPEG rejects is decoded on the CPU instead."""
        dev = self.cfg.device
        n = len(items)
        encoded = [k for k, item in enumerate(items) if item.dim() == 1]
        textures = textures or []
        batch = [items[k] for k in encoded] + textures
        images = [item.to(dev, non_blocking=True) if item.dim() == 3 else None for item in items]
        try:
            decoded = _decode_jpeg_gpu(batch, dev) if batch else []
        except RuntimeError:
            # One bad file fails the batched call: decode one by one to find it.
            decoded = [self._decode_one(t, dev) for t in batch]
        for k, img in zip(encoded, decoded):
            images[k] = img
        texture_images = decoded[len(encoded):]
        failures = [(self._reader.paths[int(indices[k])], "cannot be decoded (nvJPEG and "
                     "libjpeg both fail)") for k in range(n) if images[k] is None]
        if texture_images and any(t is None for t in texture_images):
            bad = [int(indices[k]) for k, t in enumerate(texture_images) if t is None]
            raise RuntimeError(f"texture bank {self.cfg.texture_bank}: the textures of dataset "
                               f"indices {bad[:5]} cannot be decoded: rebuild the bank with "
                               "--force")
        kept = [k for k in range(n) if images[k] is not None]
        if len(kept) < n:
            images, labels, indices = [images[k] for k in kept], labels[kept], indices[kept]
            texture_images = [texture_images[k] for k in kept] if texture_images else []
        return images, texture_images, labels, indices, failures

    @staticmethod
    def _decode_one(encoded: torch.Tensor, dev):
        try:
            return _decode_jpeg_gpu([encoded], dev)[0]
        except RuntimeError:
            pass
        try:                    # libjpeg reads some JPEGs nvJPEG rejects
            return _decode_cpu(encoded).to(dev, non_blocking=True)
        except RuntimeError:
            return None

    def _crop_on_device(self, epoch, images, textures, labels, indices) -> Batch:
        dev, cfg = self.cfg.device, self.cfg
        idx = indices.numpy()
        if images:
            views = resized_crops(images, self._reader.boxes(epoch, idx), cfg.size)
        else:
            views = torch.empty((cfg.views, 0, cfg.size, cfg.size, 3), dtype=torch.uint8,
                                device=dev)
        tex = None
        if textures:
            boxes, flips = self._reader.texture_boxes(epoch, idx)
            tex = resized_crops(textures, [boxes], cfg.size, flips)[0]
        elif cfg.texture_bank is not None:
            tex = torch.empty((0, cfg.size, cfg.size, 3), dtype=torch.uint8, device=dev)
        return Batch(tuple(views.unbind(0)), labels.to(dev, non_blocking=True),
                     indices.to(dev, non_blocking=True), tex)
