"""The fused CPU back end of fastneg.augment: aug-plus on a whole batch in one Numba kernel.

The torch path (fastneg.augment.torch_ops, the reference) runs each op as an eager pass over the
batch; here every sample (prange over the batch) goes through all its ops in at most three
passes over its pixels, each op working on one planar float32 row [3, W] that stays in L1, in
loops that LLVM vectorizes (contiguous rows, branches hoisted out of the pixel loops):

    pass 1  (only if contrast is on) the grey mean contrast blends towards: read from the uint8
            input if no op precedes contrast, else load + flip + the preceding ops, rows kept
            in a per-thread float32 image buffer [H, 3, W]
    pass 2  load + flip (unless pass 1 kept the rows), the remaining jitter ops in the sample's
            order, grayscale; then normalize into the output, or blur the row horizontally
    pass 3  (blurred samples only) the vertical blur over the buffer's rows, then normalize

Both blur passes run each tap as one loop over the three planes of a row laid end to end (a
third of the loop starts of one loop per plane, ~12% less CPU per view; the sums are the same).

Input uint8 [N, H, W, 3] is read directly (no float copy of the batch); the output is written
as float32 NHWC memory, i.e. the [N, 3, H, W] channels_last tensor apply() returns. The pixel
formulas are fastneg.augment.pixels' (shared with the CUDA kernel), inlined into the row loops.
Ops at their identity (factor 1, hue shift 0) are skipped: exactly the identity either way.
"""
from __future__ import annotations

import numba
import numpy as np

from fastneg.augment import pixels
from fastneg.augment.pixels import SIX, ZERO
from fastneg.kernels.augment_ops import BRIGHTNESS, CONTRAST, SATURATION
from fastneg.kernels.jit import cached_njit

# Flag columns of the uint8 [N, 4] array fused_aug_plus takes.
FLIP, JITTER, GRAY, BLUR = range(4)

# contract: FMAs; arcp: x / d as x * (1 / d); nsz: no signed zeros; reassoc: lets the grey sum
# vectorize. No nnan / ninf: pixel values are finite anyway, and min/max keep their meaning.
_FASTMATH = {"contract", "arcp", "nsz", "reassoc"}

_PIXELS = pixels.compile_pixels(numba.njit(inline="always", fastmath=_FASTMATH), cuda=False)
_blend, _grey, _saturation, _hue, _identity, _reflect = (_PIXELS[name] for name in (
    "_blend", "_grey", "_saturation", "_hue", "_identity", "_reflect"))


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
    total = ZERO
    for x in range(r.shape[0]):
        total += _grey(r[x], g[x], b[x], luma)
    return total


@numba.njit(inline="always", fastmath=_FASTMATH)
def _grey_sum_u8(src, luma):
    total = ZERO
    for x in range(src.shape[0]):
        total += _grey(np.float32(src[x, 0]), np.float32(src[x, 1]), np.float32(src[x, 2]),
                       luma)
    return total


@numba.njit(inline="always", fastmath=_FASTMATH)
def _blend_row(plane, f, ref):
    """Brightness (ref 0) and contrast (ref the grey mean) on one plane."""
    for x in range(plane.shape[0]):
        plane[x] = _blend(plane[x], f, ref)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _saturation_row(r, g, b, f, luma):
    """Blend towards each pixel's grey; f = 0 is grayscale (exactly: grey + 0 * (x - grey))."""
    for x in range(r.shape[0]):
        r[x], g[x], b[x] = _saturation(r[x], g[x], b[x], f, luma)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _hue_row(r, g, b, shift):
    """Rotate the HSV hue of each pixel by `shift` turns."""
    shift6 = SIX * shift
    for x in range(r.shape[0]):
        r[x], g[x], b[x] = _hue(r[x], g[x], b[x], shift6)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _jitter_row(r, g, b, op, factor, mean, luma):
    """Jitter op `op` on a row; the branch on op is outside the pixel loops (they vectorize)."""
    if op == BRIGHTNESS:
        _blend_row(r, factor, ZERO)
        _blend_row(g, factor, ZERO)
        _blend_row(b, factor, ZERO)
    elif op == CONTRAST:
        _blend_row(r, factor, mean)
        _blend_row(g, factor, mean)
        _blend_row(b, factor, mean)
    elif op == SATURATION:
        _saturation_row(r, g, b, factor, luma)
    else:
        _hue_row(r, g, b, factor)


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
        blurred[x] = ZERO
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
    acc[:] = ZERO
    for k in range(weights.shape[0]):
        wk = weights[k]
        row = image[_reflect(y + k - r, h)]
        for x in range(acc.shape[0]):
            acc[x] += wk * row[x]


# the kernel inlines fastneg.augment.pixels: its source is part of the cache key
@cached_njit(parallel=True, fastmath=_FASTMATH, depends=(pixels,))
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
        mean = ZERO
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
                            _jitter_row(r, g, b, op, factors[i, op], mean, luma)
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
                        _jitter_row(r, g, b, op, factors[i, op], mean, luma)
            if flags[i, GRAY] != 0:
                _saturation_row(r, g, b, ZERO, luma)
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


def fused_aug_plus_cpu(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift):
    """fused_aug_plus on numpy arrays (as it takes them) into a new float32 [N, H, W, 3] array,
    with its scratch (one image per Numba thread)."""
    from fastneg.host import keep_freed_memory_once
    keep_freed_memory_once()    # the outputs below reuse freed pages, call after call
    n, h, w, _ = x.shape
    # numpy asks the kernel for transparent huge pages on large arrays, torch.empty does not:
    # first-touch page faults on the fresh output cost ~2x less (measured, 224 px batches)
    out = np.empty((n, h, w, 3), np.float32)
    scratch = np.empty((numba.get_num_threads(), h, 3, w), np.float32)
    fused_aug_plus(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift, scratch, out)
    return out
