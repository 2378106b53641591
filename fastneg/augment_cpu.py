"""The CPU path of fastneg.augment: aug-plus on a whole batch in one Numba kernel.

The torch path (fastneg.augment, kept for CUDA and as the reference) runs each op as an eager
pass over the batch; here every sample (prange over the batch) goes through all its ops in at
most three passes over its pixels, each op working on one planar float32 row [3, W] that stays
in L1, in loops that LLVM vectorizes (contiguous rows, branches hoisted out of the pixel loops):

    pass 1  (only if contrast is on) the grey mean contrast blends towards: read from the uint8
            input if no op precedes contrast, else load + flip + the preceding ops, rows kept
            in a per-thread float32 image buffer [H, 3, W]
    pass 2  load + flip (unless pass 1 kept the rows), the remaining jitter ops in the sample's
            order, grayscale; then normalize into the output, or blur the row horizontally
    pass 3  (blurred samples only) the vertical blur over the buffer's rows, then normalize

Both blur passes run each tap as one loop over the three planes of a row laid end to end (a
third of the loop starts of one loop per plane, ~12% less CPU per view; the sums are the same).

Input uint8 [N, H, W, 3] is read directly (no float copy of the batch); the output is written
as float32 NHWC memory, i.e. the [N, 3, H, W] channels_last tensor apply() returns. The formulas
are the torch path's (torchvision's float formulas, 0..255 scale, a clamp after each blend).
Ops at their identity (factor 1, hue shift 0) are skipped: exactly the identity either way.
"""
from __future__ import annotations

import numba
import numpy as np

from fastneg.kernels.augment_ops import BRIGHTNESS, CONTRAST, HUE, SATURATION
from fastneg.kernels.jit import cached_njit

# Flag columns of the uint8 [N, 4] array fused_aug_plus takes.
FLIP, JITTER, GRAY, BLUR = range(4)

# float32 constants: a float64 literal would promote the pixel loops to float64 (half the
# vector width, and results off the torch path's float32 ones).
_ZERO, _ONE, _TWO, _FOUR, _SIX = (np.float32(v) for v in (0, 1, 2, 4, 6))
_MAX = np.float32(255)
_HUE_OFFSETS = (np.float32(5), np.float32(3), np.float32(1))   # HSV -> RGB: n for R, G, B

# contract: FMAs; arcp: x / d as x * (1 / d); nsz: no signed zeros; reassoc: lets the grey sum
# vectorize. No nnan / ninf: pixel values are finite anyway, and min/max keep their meaning.
_FASTMATH = {"contract", "arcp", "nsz", "reassoc"}


@numba.njit(inline="always", fastmath=_FASTMATH)
def _clamp(v):
    return min(max(v, _ZERO), _MAX)


# The row helpers take each colour plane of a row as its own 1-D array: LLVM vectorizes these
# loops, not the same loops over a 2-D [3, W] row (measured 20x slower: they stay scalar).

@numba.njit(inline="always", fastmath=_FASTMATH)
def _load_row(src, flip, r, g, b):
    """uint8 [W, 3] -> float32 planes r, g, b [W], mirrored if flip (flip commutes with all ops)."""
    w = r.shape[0]
    if flip:
        for x in range(w):
            r[x] = src[w - 1 - x, 0]
            g[x] = src[w - 1 - x, 1]
            b[x] = src[w - 1 - x, 2]
    else:
        for x in range(w):
            r[x] = src[x, 0]
            g[x] = src[x, 1]
            b[x] = src[x, 2]


@numba.njit(inline="always", fastmath=_FASTMATH)
def _grey_sum(r, g, b, luma):
    total = _ZERO
    for x in range(r.shape[0]):
        total += luma[0] * r[x] + luma[1] * g[x] + luma[2] * b[x]
    return total


@numba.njit(inline="always", fastmath=_FASTMATH)
def _grey_sum_u8(src, luma):
    total = _ZERO
    for x in range(src.shape[0]):
        total += luma[0] * np.float32(src[x, 0]) + luma[1] * np.float32(src[x, 1]) \
            + luma[2] * np.float32(src[x, 2])
    return total


@numba.njit(inline="always", fastmath=_FASTMATH)
def _blend_to(plane, f, ref):
    """Brightness (ref 0) and contrast (ref the grey mean) on one plane."""
    for x in range(plane.shape[0]):
        plane[x] = _clamp(ref + f * (plane[x] - ref))


@numba.njit(inline="always", fastmath=_FASTMATH)
def _saturation(r, g, b, f, luma):
    """Blend towards the pixel's grey; f = 0 is grayscale (exactly: grey + 0 * (x - grey))."""
    for x in range(r.shape[0]):
        grey = luma[0] * r[x] + luma[1] * g[x] + luma[2] * b[x]
        r[x] = _clamp(grey + f * (r[x] - grey))
        g[x] = _clamp(grey + f * (g[x] - grey))
        b[x] = _clamp(grey + f * (b[x] - grey))


@numba.njit(inline="always", fastmath=_FASTMATH)
def _hue_channel(h6, offset, mx, chroma):
    """One channel of HSV -> RGB: max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    k = h6 + offset
    k = k - _SIX * np.floor(k / _SIX)           # torch.remainder(k, 6)
    return mx - chroma * min(max(min(k, _FOUR - k), _ZERO), _ONE)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _hue(r, g, b, shift):
    """Rotate the HSV hue by `shift` turns: the torch path's closed form (see _adjust_hue there)."""
    shift6 = _SIX * shift
    for x in range(r.shape[0]):
        red, green, blue = r[x], g[x], b[x]
        mx = max(max(red, green), blue)
        chroma = mx - min(min(red, green), blue)
        denom = chroma if chroma > _ZERO else _ONE
        if mx == red:
            h6 = green - blue
        elif mx == green:
            h6 = blue - red + _TWO * denom
        else:
            h6 = red - green + _FOUR * denom
        h6 = h6 / denom + shift6
        r[x] = _hue_channel(h6, _HUE_OFFSETS[0], mx, chroma)
        g[x] = _hue_channel(h6, _HUE_OFFSETS[1], mx, chroma)
        b[x] = _hue_channel(h6, _HUE_OFFSETS[2], mx, chroma)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _jitter_op(r, g, b, op, factor, mean, luma):
    if op == BRIGHTNESS:
        _blend_to(r, factor, _ZERO)
        _blend_to(g, factor, _ZERO)
        _blend_to(b, factor, _ZERO)
    elif op == CONTRAST:
        _blend_to(r, factor, mean)
        _blend_to(g, factor, mean)
        _blend_to(b, factor, mean)
    elif op == SATURATION:
        _saturation(r, g, b, factor, luma)
    else:
        _hue(r, g, b, factor)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _identity(op, factor):
    return factor == (_ZERO if op == HUE else _ONE)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _store_row(r, g, b, scale, shift, dst):
    """Planar r, g, b [W] -> normalized interleaved output row [W, 3]."""
    s0, s1, s2 = scale[0], scale[1], scale[2]
    t0, t1, t2 = shift[0], shift[1], shift[2]
    for x in range(r.shape[0]):
        dst[x, 0] = r[x] * s0 + t0
        dst[x, 1] = g[x] * s1 + t1
        dst[x, 2] = b[x] * s2 + t2


@numba.njit(inline="always", fastmath=_FASTMATH)
def _blur_row(row, weights, padded, blurred):
    """Horizontal pass over the three planes of row [3, W], in place. padded, blurred: scratch of
    3 * (W + 2r): the planes reflect-padded end to end, so each tap is one loop over all three
    (a third of the loop starts of a loop per plane; the sums are the same, tap by tap)."""
    w = row.shape[1]
    r = weights.shape[0] // 2
    span = w + 2 * r
    for c in range(3):
        plane = row[c]
        base = c * span
        for x in range(w):
            padded[base + r + x] = plane[x]
        for j in range(r):                  # reflect: -1 -> 1, W -> W - 2 (r < W, see caller)
            padded[base + r - 1 - j] = plane[j + 1]
            padded[base + r + w + j] = plane[w - 2 - j]
    n = 3 * span - 2 * r                    # outputs whose taps stay inside padded
    for x in range(n):
        blurred[x] = _ZERO
    for k in range(weights.shape[0]):       # outer over taps: the inner loop is a row FMA
        wk = weights[k]
        for x in range(n):
            blurred[x] += wk * padded[x + k]
    for c in range(3):
        plane = row[c]
        base = c * span
        for x in range(w):
            plane[x] = blurred[base + x]


@numba.njit(inline="always", fastmath=_FASTMATH)
def _blur_columns_flat(acc, image, y, weights):
    """acc [3 * W] = row y of image [H, 3 * W] (three planes end to end), blurred vertically."""
    h = image.shape[0]
    r = weights.shape[0] // 2
    acc[:] = _ZERO
    for k in range(weights.shape[0]):
        src = y + k - r
        if src < 0:
            src = -src
        elif src >= h:
            src = 2 * (h - 1) - src
        wk = weights[k]
        row = image[src]
        for x in range(acc.shape[0]):
            acc[x] += wk * row[x]


@cached_njit(parallel=True, fastmath=_FASTMATH)
def fused_aug_plus(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift, scratch,
                   out):
    """aug-plus of uint8 x [N, H, W, 3] into float32 out [N, H, W, 3] (= NCHW channels_last).

    flags uint8 [N, 4] (FLIP, JITTER, GRAY, BLUR); factors float32 [N, 4] by op id (brightness,
    contrast, saturation factors, hue shift); order int64 [N, 4] op ids; kernel_x / kernel_y
    float32 [N, kw] / [N, kh] Gaussian taps (kw // 2 < W, kh // 2 < H); luma, scale, shift
    float32 [3]: out = op(x) * scale + shift; scratch float32 [threads, H, 3, W].
    """
    n, h, w, _ = x.shape
    for i in numba.prange(n):
        image = scratch[numba.get_thread_id()]
        flip = flags[i, FLIP] != 0
        jitter = flags[i, JITTER] != 0
        blur = flags[i, BLUR] != 0
        # contrast needs the grey mean of the image as it stands before contrast
        at_contrast = -1
        before_contrast = False        # does an active op precede contrast?
        if jitter and not _identity(CONTRAST, factors[i, CONTRAST]):
            for j in range(4):
                op = order[i, j]
                if op == CONTRAST:
                    at_contrast = j
                    break
                before_contrast |= not _identity(op, factors[i, op])
        mean = _ZERO
        first_op = 0                   # the first jitter position pass 2 applies
        if at_contrast >= 0:
            total = 0.0                # float64 across rows, float32 (vectorized) within one
            for y in range(h):
                if before_contrast:
                    r, g, b = image[y, 0], image[y, 1], image[y, 2]
                    _load_row(x[i, y], flip, r, g, b)
                    for j in range(at_contrast):
                        op = order[i, j]
                        if not _identity(op, factors[i, op]):
                            _jitter_op(r, g, b, op, factors[i, op], mean, luma)
                    total += _grey_sum(r, g, b, luma)
                else:
                    total += _grey_sum_u8(x[i, y], luma)    # flip does not change a mean
            mean = np.float32(total / (h * w))
            if before_contrast:
                first_op = at_contrast
        padded = np.empty(3 * (w + kernel_x.shape[1] - 1), np.float32)
        blurred = np.empty(3 * (w + kernel_x.shape[1] - 1), np.float32)
        for y in range(h):
            r, g, b = image[y, 0], image[y, 1], image[y, 2]
            if first_op == 0:
                _load_row(x[i, y], flip, r, g, b)
            if jitter:
                for j in range(first_op, 4):
                    op = order[i, j]
                    if not _identity(op, factors[i, op]):
                        _jitter_op(r, g, b, op, factors[i, op], mean, luma)
            if flags[i, GRAY] != 0:
                _saturation(r, g, b, _ZERO, luma)
            if blur:
                _blur_row(image[y], kernel_x[i], padded, blurred)
            else:
                _store_row(r, g, b, scale, shift, out[i, y])
        if blur:
            acc = np.empty(3 * w, np.float32)
            rows = image.reshape(h, 3 * w)
            for y in range(h):
                _blur_columns_flat(acc, rows, y, kernel_y[i])
                _store_row(acc[:w], acc[w:2 * w], acc[2 * w:], scale, shift, out[i, y])
