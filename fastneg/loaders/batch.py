"""What every loader yields (its own module, so the backends import it without importing the
package that builds them)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One batch of a loader."""
    views: tuple[torch.Tensor, ...]   # each uint8 [N, size, size, 3] on the loader's device
    labels: torch.Tensor              # int64 [N]
    indices: torch.Tensor             # int64 [N]: dataset index (pairs a sample with its texture)
    # uint8 [N, size, size, 3] on the loader's device: each sample's texture from the loader's
    # texture_bank, randomly cropped and flipped (loaders.common.texture_params); None without one
    textures: torch.Tensor | None = None
