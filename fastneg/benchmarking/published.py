"""The baseline of the throughput benchmark: the data path that users of the published code run.

This re-creates, for measurement only, what the authors' MoCo-v2 fork does per sample inside
DataLoader workers: torchvision ImageFolder + PIL decode, MoCo-v2 "aug-plus" with torchvision
transforms applied twice, then the non-semantic negative made in plain Python, and batches
collated to float32 and shipped to the device. It is deliberately *not* fastneg's data path and
nothing in fastneg uses it (benchmarks/throughput.py measures it). Its randomness is
torchvision's/NumPy's per-worker state (as in the original), seeded per worker so that workers
do not repeat each other.

Negatives:
- "patch": the paper's loop (docs/method.md) on the normalized float query tensor: d ~ U[lo, hi],
  n = S // d + 1 tiles per side, one random window per tile, crop the canvas to S x S.
- "texture": one more decode (the sample's texture image file) and one more aug-plus that replays
  the query's random draws, as the published code pairs each image with its texture file.
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from fastneg.kernels.augment_ops import IMAGENET_MEAN, IMAGENET_STD


class PILGaussianBlur:
    """MoCo-v2's blur: PIL GaussianBlur with sigma ~ U(0.1, 2.0) (drawn from torch's RNG so a
    texture can replay the query's draws)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        s = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def aug_plus(size: int) -> T.Compose:
    """MoCo-v2 aug-plus as in the published code (torchvision transforms on PIL images)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILGaussianBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def patch_negative_loop(q: torch.Tensor, patch_range, rng: np.random.Generator) -> torch.Tensor:
    """The published per-sample Python loop: a patch NS of one float query [C, S, S]."""
    size = q.shape[-1]
    d = int(rng.integers(patch_range[0], patch_range[1] + 1))
    n = size // d + 1
    canvas = q.new_empty((q.shape[0], n * d, n * d))
    for i in range(n):
        for j in range(n):
            y = int(rng.integers(0, size - d))
            x = int(rng.integers(0, size - d))
            canvas[:, i * d:(i + 1) * d, j * d:(j + 1) * d] = q[:, y:y + d, x:x + d]
    return canvas[:, :size, :size]


class PublishedDataset(ImageFolder):
    """ImageFolder yielding ((q, k) or (q, k, ns), label, index) like the published training set."""

    def __init__(self, root, *, size: int, negatives: str, patch_range=(16, 72),
                 texture_files=()):
        super().__init__(root)
        if negatives not in ("none", "patch", "texture"):
            raise ValueError(f"negatives must be none, patch or texture, got {negatives!r}")
        if negatives == "texture" and not texture_files:
            raise ValueError("negatives='texture' needs texture_files")
        self.transform_views = aug_plus(size)
        self.negatives = negatives
        self.patch_range = patch_range
        self.texture_files = list(texture_files)
        self.rng = np.random.default_rng(0)   # replaced per worker by _seed_worker

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = self.loader(path)
        state = torch.get_rng_state()
        q = self.transform_views(img)
        k = self.transform_views(img)
        views = [q, k]
        if self.negatives == "patch":
            views.append(patch_negative_loop(q, self.patch_range, self.rng))
        elif self.negatives == "texture":
            after_k = torch.get_rng_state()
            torch.set_rng_state(state)   # the texture gets the query's augmentation draws
            with Image.open(self.texture_files[index % len(self.texture_files)]) as tex:
                views.append(self.transform_views(tex.convert("RGB")))
            torch.set_rng_state(after_k)
        return views, label, index


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.rng = np.random.default_rng([torch.initial_seed() % 2**32, worker_id])


def published_loader(root, *, batch_size: int, size: int, negatives: str, workers: int,
                     device: torch.device, seed: int = 0, patch_range=(16, 72),
                     texture_files=()) -> DataLoader:
    """The published DataLoader: shuffled, drop_last, float32 batches (pinned for a GPU)."""
    ds = PublishedDataset(root, size=size, negatives=negatives, patch_range=patch_range,
                          texture_files=texture_files)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker,
                      generator=torch.Generator().manual_seed(seed))


def published_batches(loader: DataLoader, device: torch.device):
    """Endless finished batches (q, k, ns or None) on `device`, epoch after epoch."""
    while True:
        empty = True
        for views, _, _ in loader:
            empty = False
            views = [v.to(device, non_blocking=True) for v in views]
            yield views[0], views[1], (views[2] if len(views) > 2 else None)
        if empty:
            raise ValueError(f"dataset {loader.dataset.root} has fewer images than the batch size "
                             f"{loader.batch_size}")
