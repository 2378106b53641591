"""One Loader interface over three backends (DALI, FFCV, plain torch).

    from fastneg.loaders import build_loader, Batch
    loader = build_loader("dali", "data/shapes/train", batch_size=256, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            q_view, k_view = batch.views        # uint8 [N, size, size, 3] on `device`

Loaders only read, decode (once per sample) and crop; every pixel operation after that lives
in fastneg.augment and fastneg.kernels, so all backends feed the same augmentation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KINDS = ("dali", "ffcv", "torch")


class Batch(NamedTuple):
    """What every loader yields."""
    views: tuple[torch.Tensor, ...]   # each uint8 [N, size, size, 3] on the loader's device
    labels: torch.Tensor              # int64 [N]
    indices: torch.Tensor             # int64 [N]: dataset index (pairs a sample with its texture)
