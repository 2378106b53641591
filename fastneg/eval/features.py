"""Frozen-backbone features of an ImageFolder split, extracted once and cached: as a tensor file
(cached_features, small splits) or as a float16 shard folder written while extracting
(cached_feature_shards, any size: see fastneg.eval.shards).

Evaluation view: the loaders' evaluation crop (shorter side to size / 0.875, centre crop at the
training resolution), normalized with the training augmentation's ImageNet statistics.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from fastneg.augment import IMAGENET_MEAN, IMAGENET_STD
from fastneg.data.imagefolder import ImageList
from fastneg.eval.shards import SHARD_BYTES, FeatureShards, ShardWriter, open_shards
from fastneg.fs import atomic_file
from fastneg.loaders import build_loader


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (the identity of a checkpoint in cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalize(views_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], ImageNet-normalized."""
    dev = views_uint8_nhwc.device
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return (views_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


@torch.no_grad()
def feature_batches(backbone: torch.nn.Module, images: ImageList, *, size: int,
                    batch_size: int = 256, device="cpu"):
    """Yield (indices int64 [B], float32 [B, F] CPU features) over every image of `images`."""
    device = torch.device(device)
    # On CPU the decode and the backbone share the same cores: worker processes would only add
    # their start-up, once per split (and there are ~40 splits with the corruptions).
    loader = build_loader("torch", images.root, batch_size=batch_size, views=1, size=size,
                          scale=None, shuffle=False, drop_last=False, device=str(device),
                          workers=0 if device.type == "cpu" else None)
    backbone.eval().to(device)
    for batch in loader:
        yield batch.indices.cpu(), backbone(normalize(batch.views[0])).float().cpu()


def extract_features(backbone: torch.nn.Module, images: ImageList, *, size: int,
                     batch_size: int = 256, device="cpu") -> torch.Tensor:
    """float32 [N, F] features of every image of `images`, in listing order."""
    feats = None
    for indices, f in feature_batches(backbone, images, size=size, batch_size=batch_size,
                                      device=device):
        if feats is None:
            feats = torch.empty(len(images), f.shape[1])
        feats[indices] = f
    return feats


def cached_features(backbone, images: ImageList, *, size: int, cache_file, key: str,
                    batch_size: int = 256, device="cpu") -> torch.Tensor:
    """extract_features, read from `cache_file` when it was written for the same `key`.

    `key` names everything the features depend on (checkpoint bytes, image listing, size), so a
    retrained checkpoint or a changed split is never served stale features.
    """
    cache_file = Path(cache_file)
    if cache_file.exists():
        cached = torch.load(cache_file, weights_only=True)
        if cached.get("key") == key:
            return cached["features"]
    feats = extract_features(backbone, images, size=size, batch_size=batch_size, device=device)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache_file) as tmp:   # a killed run never leaves a truncated cache
        torch.save({"key": key, "features": feats}, tmp)
    return feats


def cached_feature_shards(backbone, images: ImageList, *, size: int, folder, key: str,
                          batch_size: int = 256, device="cpu",
                          shard_bytes: int = SHARD_BYTES) -> FeatureShards:
    """The features of `images` as a memory-mapped float16 shard folder (fastneg.eval.shards),
    read from `folder` when it holds a complete cache written for `key`, else extracted into
    it. Host memory stays bounded by about two shards whatever the split's size; the folder
    is staged beside `folder` and renamed into place when complete, so an interrupted
    extraction is recomputed next time, never read.
    """
    cached = open_shards(folder, key=key)
    if cached is not None:
        return cached
    with ShardWriter(folder, len(images), key=key, shard_bytes=shard_bytes) as writer:
        for indices, f in feature_batches(backbone, images, size=size, batch_size=batch_size,
                                          device=device):
            writer.write(indices, f)
    opened = open_shards(folder, key=key)
    if opened is None:   # only if something removed or changed it under us
        raise FileNotFoundError(f"feature cache {folder} vanished right after it was written")
    return opened
