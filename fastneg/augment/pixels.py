"""The per-pixel formulas of aug-plus, written once for both fused kernels.

Plain Python on float32 scalars, compiled by `compile_pixels` for each target the way
fastneg.kernels.rng compiles its RNG: numba.njit(inline="always") for the CPU kernel
(fastneg.augment.cpu) and rng.cuda_device_jit() for the CUDA kernel (fastneg.augment.cuda). The
formulas are those of the torch path (fastneg.augment.torch_ops): torchvision's float formulas
on the 0..255 scale, a clamp after every jitter op.

Every constant is a float32: a float64 literal would promote the pixel loops to float64 (half
the CPU vector width, and results off the torch path's float32 ones).
"""
from __future__ import annotations

import math

import numpy as np

from fastneg.kernels import rng
from fastneg.kernels.augment_ops import BRIGHTNESS, CONTRAST, HUE, SATURATION

ZERO, ONE, TWO, FOUR, SIX = (np.float32(v) for v in (0, 1, 2, 4, 6))
MAX = np.float32(255)
HUE_OFFSETS = (np.float32(5), np.float32(3), np.float32(1))   # HSV -> RGB: n for R, G, B


# floor of a float32 as a float32: numpy's ufunc on the CPU, math.floor on CUDA (numba-cuda has
# no numpy ufuncs in device code). The two agree on every finite float32 the hue op produces.
def _floor_numpy(v):
    return np.floor(v)


def _floor_math(v):
    return np.float32(math.floor(v))


# The sources below call each other (and _floor) through globals bound by compile_pixels.
def _clamp(v):
    return min(max(v, ZERO), MAX)


def _identity(op, factor):
    """Is jitter op `op` with this factor (hue: shift) the identity? Such ops are skipped."""
    return factor == (ZERO if op == HUE else ONE)


def _blend(v, f, ref):
    """clamp(ref + f * (v - ref)): brightness (ref 0), contrast (ref the grey mean), saturation
    (ref the pixel's grey; f = 0 is grayscale, exactly)."""
    return _clamp(ref + f * (v - ref))


def _grey(r, g, b, luma):
    return luma[0] * r + luma[1] * g + luma[2] * b


def _saturation(r, g, b, f, luma):
    grey = _grey(r, g, b, luma)
    return _blend(r, f, grey), _blend(g, f, grey), _blend(b, f, grey)


def _hue_channel(h6, offset, mx, chroma):
    """One channel of HSV -> RGB: max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    k = h6 + offset
    k = k - SIX * _floor(k / SIX)           # torch.remainder(k, 6)  # noqa: F821
    return mx - chroma * min(max(min(k, FOUR - k), ZERO), ONE)


def _hue(r, g, b, shift6):
    """Rotate the HSV hue by shift6 / 6 turns: the closed form of torch_ops._adjust_hue."""
    mx = max(max(r, g), b)
    chroma = mx - min(min(r, g), b)
    denom = chroma if chroma > ZERO else ONE
    if mx == r:
        h6 = g - b
    elif mx == g:
        h6 = b - r + TWO * denom
    else:
        h6 = r - g + FOUR * denom
    h6 = h6 / denom + shift6
    return (_hue_channel(h6, HUE_OFFSETS[0], mx, chroma),
            _hue_channel(h6, HUE_OFFSETS[1], mx, chroma),
            _hue_channel(h6, HUE_OFFSETS[2], mx, chroma))


def _jitter(r, g, b, op, f, mean, luma):
    """(r, g, b) after jitter op `op` with factor f (hue: shift in turns); mean: contrast's."""
    if op == BRIGHTNESS:
        return _blend(r, f, ZERO), _blend(g, f, ZERO), _blend(b, f, ZERO)
    if op == CONTRAST:
        return _blend(r, f, mean), _blend(g, f, mean), _blend(b, f, mean)
    if op == SATURATION:
        return _saturation(r, g, b, f, luma)
    return _hue(r, g, b, SIX * f)


def _reflect(i, n):
    """Index i of a reflect-padded axis of length n (-1 -> 1, n -> n - 2; |overhang| < n)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


_SOURCES = (_clamp, _identity, _blend, _grey, _saturation, _hue_channel, _hue, _jitter, _reflect)


def compile_pixels(jit, *, cuda: bool) -> dict:
    """The formulas compiled with `jit`, by source name ("_clamp", "_hue", ...), each calling the
    compiled versions of the ones it uses. cuda: compile for numba.cuda (its floor)."""
    names = {"_floor": jit(rng._rebind(_floor_math if cuda else _floor_numpy, {}))}
    for fn in _SOURCES:            # in dependency order: _rebind copies the names bound so far
        names[fn.__name__] = jit(rng._rebind(fn, names))
    return names
