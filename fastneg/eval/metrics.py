"""Accuracy and the shape-bias metric."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top1(predictions, labels) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-D of equal length; got "
                         f"{p.shape} and {y.shape}")
    if len(p) == 0:
        raise ValueError("top-1 of an empty split is undefined")
    return float((p == y).mean())


def shape_bias(predictions: Sequence[int], *, shape: Sequence[int],
               texture: Sequence[int]) -> float:
    """Geirhos et al. (ICLR 2019) shape bias of cue-conflict predictions.

    Among the images classified as either their shape class or their texture's class, the
    fraction classified by shape. `texture[i]` is the class whose dominant texture image i
    carries; images whose two cues agree carry no information and are skipped. NaN when no
    prediction matches either cue.
    """
    p, s, t = (np.asarray(a, np.int64) for a in (predictions, shape, texture))
    if not (p.shape == s.shape == t.shape) or p.ndim != 1:
        raise ValueError(f"predictions, shape and texture must be 1-D of equal length; got "
                         f"{p.shape}, {s.shape}, {t.shape}")
    conflict = s != t
    by_shape = int(((p == s) & conflict).sum())
    by_texture = int(((p == t) & conflict).sum())
    if by_shape + by_texture == 0:
        return float("nan")
    return by_shape / (by_shape + by_texture)
