"""Random-resized-crop boxes from the counter-based RNG, shared by loaders and texture sampling.

The sampling rule is torchvision's RandomResizedCrop.get_params: up to 10 attempts of
(area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), the first box that fits wins, else
a centre crop clamped to the ratio range. Differences from torchvision: the draws come from
fastneg.kernels.rng (so any worker, rank or device computes the same box for the same
(seed, step, sample)), and rounding is floor(x + 0.5) instead of Python's half-to-even (the two
differ only on exact ties).

The box function is plain Python compiled for each target, like the RNG.
"""
import math

import numba
import numpy as np

from fastneg.kernels import rng
from fastneg.kernels.jit import cached_njit

ATTEMPTS = 10
SLOTS_PER_BOX = 2 * ATTEMPTS + 2   # (area, ratio) per attempt, then (top, left)


def _rrc_box(seed, step, sample, slot0, h, w, scale_lo, scale_hi, logr_lo, logr_hi):
    """(top, left, height, width) of one random resized crop of an h x w image."""
    area = h * w
    for attempt in range(ATTEMPTS):
        u_area = _uniform(seed, step, sample, slot0 + 2 * attempt)
        u_ratio = _uniform(seed, step, sample, slot0 + 2 * attempt + 1)
        target = area * (scale_lo + (scale_hi - scale_lo) * u_area)
        aspect = math.exp(logr_lo + (logr_hi - logr_lo) * u_ratio)
        cw = int(math.floor(math.sqrt(target * aspect) + 0.5))
        ch = int(math.floor(math.sqrt(target / aspect) + 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            top = _randint(seed, step, sample, slot0 + 2 * ATTEMPTS, 0, h - ch)
            left = _randint(seed, step, sample, slot0 + 2 * ATTEMPTS + 1, 0, w - cw)
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < math.exp(logr_lo):
        cw = w
        ch = int(math.floor(cw / math.exp(logr_lo) + 0.5))
    elif in_ratio > math.exp(logr_hi):
        ch = h
        cw = int(math.floor(ch * math.exp(logr_hi) + 0.5))
    else:
        cw = w
        ch = h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def rrc_box(seed, step, sample, slot0, h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Interpreted version (references and tests)."""
    f = rng._rebind(_rrc_box, {"_uniform": rng.uniform, "_randint": rng.randint})
    return f(seed, step, sample, slot0, h, w, scale[0], scale[1],
             math.log(ratio[0]), math.log(ratio[1]))


def _compile(jit, uniform, randint):
    return jit(rng._rebind(_rrc_box, {"_uniform": uniform, "_randint": randint}))


rrc_box_cpu = _compile(numba.njit(inline="always"), rng.uniform_cpu, rng.randint_cpu)


def rrc_box_cuda():
    """The box function as a numba.cuda device function (imports numba.cuda when called)."""
    _, uniform, randint = rng.cuda_functions()
    return _compile(rng.cuda_device_jit(), uniform, randint)


@cached_njit()
def _rrc_boxes(seed, step, samples, heights, widths, slot0, scale_lo, scale_hi, logr_lo, logr_hi,
               out):
    for i in range(samples.shape[0]):
        t, l, ch, cw = rrc_box_cpu(seed, step, samples[i], slot0, heights[i], widths[i],
                                   scale_lo, scale_hi, logr_lo, logr_hi)
        out[i, 0] = t
        out[i, 1] = l
        out[i, 2] = ch
        out[i, 3] = cw


def rrc_boxes(seed, step, samples, heights, widths, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
              slot0=rng.slot(rng.STREAM_CROP, 0)):
    """int64 [N, 4] boxes (top, left, height, width) for N images of the given sizes.

    `samples` are the per-sample counters (usually dataset indices); use a different `slot0`
    (e.g. slot0 + v * SLOTS_PER_BOX) for each view of the same sample.
    """
    samples = np.ascontiguousarray(samples, np.int64)
    heights = np.ascontiguousarray(np.broadcast_to(heights, samples.shape), np.int64)
    widths = np.ascontiguousarray(np.broadcast_to(widths, samples.shape), np.int64)
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                         f"got scale={scale}, ratio={ratio}")
    if (heights < 1).any() or (widths < 1).any():
        raise ValueError("image heights and widths must be >= 1")
    out = np.empty((samples.shape[0], 4), np.int64)
    _rrc_boxes(seed, step, samples, heights, widths, slot0, float(scale[0]), float(scale[1]),
               math.log(ratio[0]), math.log(ratio[1]), out)
    return out
