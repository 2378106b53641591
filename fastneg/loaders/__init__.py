"""One Loader interface over three backends (DALI, FFCV, plain torch).

    from fastneg.loaders import build_loader, Batch
    loader = build_loader("dali", "data/shapes/train", batch_size=256, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            q_view, k_view = batch.views        # uint8 [N, size, size, 3] on `device`
            batch.textures                      # same, with texture_bank=BANK; else None

Loaders only read, decode (once per sample) and crop; every pixel operation after that lives
in fastneg.augment and fastneg.kernels, so all backends feed the same augmentation.

All backends agree on the dataset index of a file (its position in
fastneg.data.imagefolder.scan_image_folder), on the epoch order and its shards (one permutation
per (seed, epoch) from fastneg's RNG, see loaders.common) and, for images of the same size, on the
crop windows (fastneg.kernels.crop boxes of (seed, epoch, index, view)). They differ in the
resampling filter of the resize (see each backend's docstring) and FFCV in the stored pixels
(re-encoded JPEG with a maximum side, see fastneg.data.convert).
"""
from __future__ import annotations

import importlib
import importlib.util

from fastneg.loaders.batch import Batch

__all__ = ["KINDS", "Batch", "available_kinds", "build_loader"]

KINDS = ("dali", "ffcv", "torch")
# kind -> (backend module, the package it needs, the pip extra that installs it)
_BACKENDS = {
    "dali": ("fastneg.loaders.dali", "nvidia.dali", "dali"),
    "ffcv": ("fastneg.loaders.ffcv", "ffcv", "ffcv"),
    "torch": ("fastneg.loaders.torch_loader", "torchvision", "all"),
}

# kind -> the module of its loader over tar shards (WebDataset layout, fastneg.data.shards)
_SHARD_BACKENDS = {"dali": "fastneg.loaders.shards_dali", "torch": "fastneg.loaders.shards_torch"}


def available_kinds() -> tuple[str, ...]:
    """The kinds whose library is installed here (found, not imported: FFCV's import is slow)."""
    return tuple(k for k in KINDS if importlib.util.find_spec(_BACKENDS[k][1].split(".")[0])
                 and importlib.util.find_spec(_BACKENDS[k][1]))


def build_loader(kind: str, data, *, batch_size: int, views: int = 2, size: int = 224,
                 scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int | None = None,
                 drop_last: bool = True, shuffle: bool = True, skip_bad: bool = False,
                 texture_bank=None, report_skipped: bool = True):
    """A Loader of `kind` over `data`: an ImageFolder root, or for "ffcv" a .beton written by
    `fastneg convert --to ffcv`, or for "dali" and "torch" tar shards in the WebDataset layout
    (a folder of *.tar, a brace pattern such as train-{0000..0146}.tar, a URL or pipe:CMD; see
    fastneg.data.shards; ranks read disjoint shards, see fastneg.loaders.shards).

    Each batch: `views` random resized crops (area fraction in `scale`, aspect ratio in `ratio`)
    of one decode per image, as uint8 [N, size, size, 3] on `device`, with labels and dataset
    indices (also on `device`). texture_bank: a texture bank folder stored as JPEG (`fastneg
    build-bank`, the default format) made from `data`'s images: each batch then also carries the
    samples' textures (Batch.textures), decoded with the images and given one random resized
    crop + flip each, drawn per (seed, epoch, dataset index) exactly as
    fastneg.kernels.sample_textures draws for (sample = dataset index, step = epoch); for "ffcv"
    the textures are a field of the .beton (`fastneg convert --texture-bank BANK`) and this
    argument only switches them on. scale=None (with views=1, and usually shuffle=False) gives the
    evaluation crop: shorter side resized to size / 0.875, centre size x size.
    rank / world_size shard the epoch; `seed` and set_epoch(e) fix order and crops. `workers`
    (default: loaders.common.default_workers: this process's cores / LOCAL_WORLD_SIZE, at most
    12) are DataLoader processes for "torch" (0: none)
    and CPU threads for DALI and FFCV. Files no decoder can read stop the build with a
    ValueError naming them, or with skip_bad=True are left out and counted in `loader.skipped`
    (and logged at the end of each epoch by rank 0, unless report_skipped=False: a caller that
    reports `loader.bad_files` itself, as the trainer does for all ranks together); see
    loaders.common.LoaderBase for files that fail only when decoded.
    """
    from fastneg.data.ffcv_import import import_ffcv
    from fastneg.loaders.common import LoaderConfig

    if kind not in _BACKENDS:
        raise ValueError(f"unknown loader kind {kind!r}; choose one of {', '.join(KINDS)}")
    cfg = LoaderConfig(batch_size=batch_size, views=views, size=size,
                       scale=None if scale is None else tuple(scale), ratio=tuple(ratio),
                       device=device, rank=rank, world_size=world_size, seed=seed,
                       workers=workers, drop_last=drop_last, shuffle=shuffle, skip_bad=skip_bad,
                       report_skipped=report_skipped,
                       texture_bank=None if texture_bank is None else str(texture_bank))
    from fastneg.data.shards import looks_like_shards

    shards = looks_like_shards(data)
    if shards and kind == "ffcv":
        raise ValueError(f"{data}: the ffcv loader reads a .beton (fastneg convert --to ffcv); "
                         "tar shards are read by the dali and torch loaders")
    module_name, package, extra = _BACKENDS[kind]
    try:
        if kind == "ffcv":
            import_ffcv()              # not a plain import: see fastneg.data.ffcv_import
        else:
            importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"the {kind!r} loader needs {package}, which cannot be imported here "
                          f"({e}); install it with: pip install 'fastneg[{extra}]'") from e
    if shards:   # see fastneg.loaders.shards
        return importlib.import_module(_SHARD_BACKENDS[kind]).ShardLoader(data, cfg)
    return importlib.import_module(module_name).Loader(data, cfg)
