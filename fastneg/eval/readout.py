"""What frozen features encode: linear read-outs per factor and the scramble similarity.

Read-outs (the Trifeature design of Hermann and Lampinen 2020): for each factor of the embedded
dataset's metadata.csv (shape, texture family, colour), a multinomial logistic regression on
the frozen train features predicts the factor; its accuracy on val says how linearly decodable
that factor is. The regularization is chosen by k-fold cross-validation on train only (val is
never used to choose it): with a few thousand images and hundreds of features an unregularized
probe overfits. On a dataset made with `fastneg make-data --independent` the factors are
independent, so each read-out measures one factor alone.

Scramble similarity: the mean cosine similarity between the features of an image and of its
patch-scrambled copy (fastneg.kernels.patch_negatives, the paper's patch NS). Features that rest
on local texture hardly change under scrambling (similarity near 1); features of the global
shape do. Measured at patch sides not used in training, so it is not the training objective
read back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastneg.data.imagefolder import ImageList
from fastneg.eval.features import normalize
from fastneg.eval.linear import train_linear_probe
from fastneg.eval.shards import as_tensor
from fastneg.kernels import patch_negatives
from fastneg.loaders import build_loader

FACTORS = ("shape", "texture", "colour")
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def factor_targets(images: ImageList) -> dict[str, np.ndarray]:
    """{factor: int64 [N] class ids in listing order} from the split's metadata.csv.

    Factors are the FACTORS columns present with at least two values; ids number the sorted
    values, so every split of one dataset numbers them alike. {} without a metadata.csv.
    Raises ValueError naming the file when a listed image has no row.
    """
    import csv
    meta = Path(images.root) / "metadata.csv"
    if not meta.exists():
        return {}
    with open(meta, newline="") as fh:
        rows = {Path(r["file"]).as_posix(): r for r in csv.DictReader(fh)}
    missing = [f for f in images.files if Path(f).as_posix() not in rows]
    if missing:
        raise ValueError(f"{meta} has no row for {missing[0]} ({len(missing)} image(s) missing)")
    out = {}
    for factor in FACTORS:
        values = [rows[Path(f).as_posix()].get(factor) for f in images.files]
        if any(v is None for v in values):
            continue
        names = sorted(set(values))
        if len(names) < 2:
            continue
        index = {v: i for i, v in enumerate(names)}
        out[factor] = np.asarray([index[v] for v in values], np.int64)
    return out


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def cv_readout(train_f: torch.Tensor, train_y: np.ndarray, test_f: torch.Tensor,
               test_y: np.ndarray, *, weight_decays=WEIGHT_DECAYS, folds: int = 3,
               seed: int = 0, max_iter: int = 100) -> dict:
    """Linear read-out accuracy on (test_f, test_y), its weight decay chosen by CV on train.

    Returns {"accuracy", "weight_decay", "cv": {weight decay: mean held-out accuracy}}.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small problems: threads only wait on each other on busy cores
    try:
        return _cv_readout(train_f, train_y, test_f, test_y, weight_decays, folds, seed,
                           max_iter)
    finally:
        torch.set_num_threads(threads)


def _cv_readout(train_f, train_y, test_f, test_y, weight_decays, folds, seed, max_iter):
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    y = torch.from_numpy(np.asarray(train_y, np.int64))
    cv = {}
    parts = _folds(len(y), folds, seed)
    for wd in weight_decays:
        accs = []
        for i, held in enumerate(parts):
            fit = np.concatenate([p for j, p in enumerate(parts) if j != i])
            probe = train_linear_probe(train_f[fit], y[fit], num_classes=n_cls,
                                       weight_decay=wd, max_iter=max_iter)
            accs.append(float((probe.predict(train_f[held]).numpy() == train_y[held]).mean()))
        cv[wd] = float(np.mean(accs))
    best = max(weight_decays, key=lambda wd: (cv[wd], wd))   # ties: the stronger regularization
    probe = train_linear_probe(train_f, y, num_classes=n_cls, weight_decay=best,
                               max_iter=max_iter)
    acc = float((probe.predict(test_f).numpy() == np.asarray(test_y)).mean())
    return {"accuracy": acc, "weight_decay": best, "cv": {str(k): v for k, v in cv.items()}}


def readouts(train: ImageList, train_f, test: ImageList, test_f, **kwargs) -> dict:
    """{factor: cv_readout(...)} for every factor both splits' metadata.csv carry (features:
    tensors or FeatureShards, loaded whole only when there is a factor to read out)."""
    a, b = factor_targets(train), factor_targets(test)
    factors = [f for f in a if f in b]
    if factors:
        train_f, test_f = as_tensor(train_f), as_tensor(test_f)
    return {f: cv_readout(train_f, a[f], test_f, b[f], **kwargs) for f in factors}


def scramble_patch_range(train_range, size: int) -> tuple[int, int]:
    """Patch sides just above the training range: (hi + 1, hi + size // 8), kept below size."""
    hi = int(train_range[1])
    lo = min(hi + 1, size - 1)
    return lo, max(lo, min(size - 1, hi + max(1, size // 8)))


def cosine_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] cosine similarity of row i of a with row i of b."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


@torch.no_grad()
def scramble_similarity(backbone: torch.nn.Module, images: ImageList, *, size: int,
                        patch_range, seed: int = 0, batch_size: int = 256,
                        device="cpu") -> float:
    """Mean cosine similarity between the features of each image (evaluation view) and of its
    patch-scrambled copy, patch sides drawn from `patch_range` (inclusive)."""
    device = torch.device(device)
    loader = build_loader("torch", images.root, batch_size=batch_size, views=1, size=size,
                          scale=None, shuffle=False, drop_last=False, device=str(device),
                          workers=0 if device.type == "cpu" else None)
    backbone.eval().to(device)
    total, count = 0.0, 0
    for step, batch in enumerate(loader):
        x = normalize(batch.views[0]).contiguous()
        scrambled = patch_negatives(x, layout="nchw", patch_range=tuple(patch_range),
                                    seed=seed, step=step)
        sims = cosine_pairs(backbone(x), backbone(scrambled))
        total += float(sims.sum())
        count += len(sims)
    return total / count
