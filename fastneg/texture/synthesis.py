"""Example-based texture synthesis: image quilting (Efros and Freeman 2001) with several exemplars.

The output is tiled with square blocks of `block` pixels that overlap their left and upper
neighbours by `overlap` pixels. For each block, every window of every exemplar is a candidate;
its overlap error is the sum of squared differences (SSD) between the candidate and the pixels
already placed, over the L-shaped overlap. One candidate is drawn uniformly among those whose
error is within (1 + tol) of the best, pasted, and joined to its neighbours along the minimum-error
boundary cut through the overlap (dynamic programming), so each block is a verbatim copy of an
exemplar window except on its side of the seam.

The search: the SSD over all candidate positions is  sum(E^2) - 2 * corr(E, T) + sum(T^2)  for
exemplar E and template T (the L-shaped overlap, zero elsewhere). sum(E^2) over the L comes from an
integral image; the correlation for all windows at once comes from one FFT product per block
(numpy's pocketfft, float64), and sum(T^2) is one number. The correlation of integer images is an
integer, and the float64 FFT is orders of magnitude more precise than 0.5 at these sizes, so it is
rounded: errors are exact integers, choices never depend on floating-point noise, and a texture is
the same bytes on every machine and in every batch. Numba compiles the rest (template, error map,
choice, cut, paste).

Randomness: every choice is rng.randint(seed, 0, sample, slot(STREAM_TEXSYN, first_slot + b)),
so texture `sample` depends only on (seed, sample) and the exemplars.

The paper's recipe (`synthesize`): exemplars = the central and one random 96x96 crop of the
source image, output 224x224. Tiny-image rule: a source whose shorter side is below the exemplar
size is first upscaled (bicubic, aspect kept) so that its shorter side equals the exemplar size.
Speed and the choice of a CPU-only path: docs/implementation-notes.md.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from PIL import Image

from fastneg.kernels import rng
from fastneg.kernels.jit import cached_njit

PAPER_EXEMPLAR = 96
PAPER_SIZE = 224
# Block = 3/8 of the exemplar side (36 for 96), overlap = 1/6 of the block (Efros and Freeman).
BLOCK_FRACTION = 0.375
OVERLAP_FRACTION = 1 / 6
CROP_SLOTS = 2        # synthesize() draws the random crop's (top, left) in slots 0 and 1
_NO_CANDIDATE = np.iinfo(np.int64).max


def default_block(exemplar: int) -> tuple[int, int]:
    """(block, overlap) for an exemplar side: 36 and 6 for the paper's 96."""
    block = max(2, round(exemplar * BLOCK_FRACTION))
    return block, max(1, round(block * OVERLAP_FRACTION))


# ---------------------------------------------------------------- compiled kernels
# cache=True where a kernel depends on no configuration and no other module: workers started
# without fork then load it instead of compiling it again.

@numba.njit(cache=True)
def _energy_integral(ex, out):
    """out[k, y, x] = sum of E^2 (all channels) over ex[k, :y, :x]  (integral image)."""
    for k in range(ex.shape[0]):
        for y in range(ex.shape[1]):
            row = np.int64(0)
            for x in range(ex.shape[2]):
                for c in range(3):
                    v = np.int64(ex[k, y, x, c])
                    row += v * v
                out[k, y + 1, x + 1] = out[k, y, x + 1] + row


@numba.njit(inline="always")
def _rect(s, k, y, x, h, w):
    return s[k, y + h, x + w] - s[k, y, x + w] - s[k, y + h, x] + s[k, y, x]


@numba.njit(inline="always")
def _in_overlap(i, j, ov, has_left, has_top):
    return (has_left and j < ov) or (has_top and i < ov)


@numba.njit(cache=True)
def _fill_template(canvas, py, px, block, ov, has_left, has_top, tmpl):
    """tmpl[c] = canvas block at (py, px) on the overlap, 0 elsewhere; returns sum(T^2)."""
    t2 = np.int64(0)
    for i in range(block):
        for j in range(block):
            inside = _in_overlap(i, j, ov, has_left, has_top)
            for c in range(3):
                v = np.int64(canvas[py + i, px + j, c]) if inside else np.int64(0)
                tmpl[c, i, j] = v
                t2 += v * v
    return t2


@numba.njit(cache=True)
def _cross_spectrum(fe, ft, out):
    """out[k] = sum_c FE[k, c] * conj(FT[c]): the spectrum of corr(E_k, T) over all channels."""
    for k in range(fe.shape[0]):
        for u in range(ft.shape[1]):
            for v in range(ft.shape[2]):
                acc = 0j
                for c in range(3):
                    acc += fe[k, c, u, v] * ft[c, u, v].conjugate()
                out[k, u, v] = acc


@numba.njit(inline="always")
def _vertical_cut(err, rows, cols, path, cost):
    """Minimum-cost top-to-bottom path through err[:rows, :cols]; path[i] = its column in row i."""
    for j in range(cols):
        cost[0, j] = err[0, j]
    for i in range(1, rows):
        for j in range(cols):
            best = cost[i - 1, j]
            if j > 0 and cost[i - 1, j - 1] < best:
                best = cost[i - 1, j - 1]
            if j + 1 < cols and cost[i - 1, j + 1] < best:
                best = cost[i - 1, j + 1]
            cost[i, j] = err[i, j] + best
    j = 0
    for jj in range(1, cols):
        if cost[rows - 1, jj] < cost[rows - 1, j]:
            j = jj
    path[rows - 1] = j
    for i in range(rows - 2, -1, -1):
        prev = path[i + 1]
        j = prev
        if prev > 0 and cost[i, prev - 1] < cost[i, j]:
            j = prev - 1
        if prev + 1 < cols and cost[i, prev + 1] < cost[i, j]:
            j = prev + 1
        path[i] = j


@numba.njit(cache=True)
def _overlap_errors(sizes, energy, corr, t2, block, ov, has_left, has_top, errors):
    """errors[k, y, x] = SSD over the overlap of window (y, x) of exemplar k (exact integers);
    windows outside a smaller exemplar get _NO_CANDIDATE. Returns the smallest error."""
    best = _NO_CANDIDATE
    x0 = ov if has_left else 0      # the top strip starts after the left strip's columns
    for k in range(errors.shape[0]):
        for y in range(errors.shape[1]):
            for x in range(errors.shape[2]):
                if y > sizes[k, 0] - block or x > sizes[k, 1] - block:
                    errors[k, y, x] = _NO_CANDIDATE
                    continue
                e2 = np.int64(0)
                if has_left:
                    e2 += _rect(energy, k, y, x, block, ov)
                if has_top:
                    e2 += _rect(energy, k, y, x + x0, ov, block - x0)
                ssd = e2 - 2 * np.int64(np.rint(corr[k, y, x])) + t2
                errors[k, y, x] = ssd
                if ssd < best:
                    best = ssd
    return best


@cached_njit()   # inlines fastneg.kernels.rng: the cache key covers it
def _place_block(canvas, ex, errors, threshold, py, px, block, ov, has_left, has_top,
                 seed, sample, draw_slot, placement):
    """Draw one window among those with errors <= threshold, then cut and paste it at (py, px).

    The draw is uniform over the qualifying windows in (k, y, x) order; placement gets (k, y, x).
    """
    count = np.int64(0)
    for k in range(errors.shape[0]):
        for y in range(errors.shape[1]):
            for x in range(errors.shape[2]):
                if errors[k, y, x] <= threshold:
                    count += 1
    pick = rng.randint_cpu(seed, 0, sample, draw_slot, 0, count - 1)
    seen = np.int64(0)
    ck, cy, cx = 0, 0, 0
    for k in range(errors.shape[0]):
        for y in range(errors.shape[1]):
            for x in range(errors.shape[2]):
                if errors[k, y, x] <= threshold:
                    if seen == pick:
                        ck, cy, cx = k, y, x
                    seen += 1
    placement[0] = ck
    placement[1] = cy
    placement[2] = cx

    # Minimum-error boundary cuts: vertical through the left overlap, horizontal through the top.
    err = np.zeros((block, block), np.int64)
    for i in range(block):
        for j in range(block):
            if _in_overlap(i, j, ov, has_left, has_top):
                for c in range(3):
                    d = np.int64(ex[ck, cy + i, cx + j, c]) - np.int64(canvas[py + i, px + j, c])
                    err[i, j] += d * d
    cost = np.empty((block, block), np.int64)
    vpath = np.zeros(block, np.int64)    # per row: first column taken from the new block
    hpath = np.zeros(block, np.int64)    # per column: first row taken from the new block
    if has_left:
        _vertical_cut(err, block, ov, vpath, cost)
    if has_top:
        _vertical_cut(err.T, block, ov, hpath, cost)
    for i in range(block):
        for j in range(block):
            keep_old = (has_left and j < vpath[i]) or (has_top and i < hpath[j])
            if not keep_old:
                for c in range(3):
                    canvas[py + i, px + j, c] = ex[ck, cy + i, cx + j, c]


# ---------------------------------------------------------------- Python API

def _as_exemplars(exemplars, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate and stack exemplars -> (uint8 [K, Hp, Wp, 3] zero-padded, int64 [K, 2] sizes)."""
    if isinstance(exemplars, np.ndarray) and exemplars.ndim == 3:
        exemplars = [exemplars]
    exemplars = list(exemplars)
    if not exemplars:
        raise ValueError("quilt needs at least one exemplar")
    for n, e in enumerate(exemplars):
        if not isinstance(e, np.ndarray) or e.dtype != np.uint8 or e.ndim != 3 or e.shape[2] != 3:
            raise ValueError(f"exemplar {n} must be a uint8 array [H, W, 3], got "
                             f"{getattr(e, 'dtype', type(e).__name__)} {getattr(e, 'shape', '')}")
        if min(e.shape[:2]) < block:
            raise ValueError(f"exemplar {n} is {e.shape[0]}x{e.shape[1]}, smaller than the "
                             f"block size {block}: use a smaller block or larger exemplars")
    sizes = np.array([e.shape[:2] for e in exemplars], np.int64)
    stack = np.zeros((len(exemplars), sizes[:, 0].max(), sizes[:, 1].max(), 3), np.uint8)
    for k, e in enumerate(exemplars):
        stack[k, :e.shape[0], :e.shape[1]] = e
    return stack, sizes


def quilt(exemplars, size, *, block: int = 36, overlap: int = 6, tol: float = 0.1,
          seed: int = 0, sample: int = 0, first_slot: int = 0, return_placements: bool = False):
    """Synthesize a uint8 [H, W, 3] texture from one or more uint8 [h, w, 3] exemplars.

    size: int or (H, W). Blocks are block x block with `overlap` pixels shared with the left and
    upper neighbours; tol is the Efros-Freeman tolerance. Random draws use
    (seed, sample, slot(STREAM_TEXSYN, first_slot + block number)).
    With return_placements, also returns int64 [ny, nx, 3]: (exemplar, top, left) of each block,
    whose top-left corner in the output is (row * (block - overlap), col * (block - overlap)).
    """
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"texture size must be positive, got {h}x{w}")
    if not 1 <= overlap < block:
        raise ValueError(f"need 1 <= overlap < block, got overlap {overlap}, block {block}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    ex, sizes = _as_exemplars(exemplars, block)
    step = block - overlap
    ny = max(1, math.ceil((h - overlap) / step))
    nx = max(1, math.ceil((w - overlap) / step))
    if first_slot + ny * nx > 1 << rng.SLOT_BITS:
        raise ValueError(f"a {h}x{w} texture of {block}-pixel blocks needs {ny * nx} random "
                         f"draws, more than the {1 << rng.SLOT_BITS} of one RNG stream: "
                         "use larger blocks")
    canvas = np.zeros((ny * step + overlap, nx * step + overlap, 3), np.uint8)

    k_ex, hp, wp = ex.shape[:3]
    energy = np.zeros((k_ex, hp + 1, wp + 1), np.int64)
    _energy_integral(ex, energy)
    fe = np.fft.rfft2(ex.transpose(0, 3, 1, 2).astype(np.float64))
    tmpl = np.empty((3, block, block), np.float64)
    spectrum = np.empty((k_ex, hp, wp // 2 + 1), np.complex128)
    errors = np.zeros((k_ex, hp - block + 1, wp - block + 1), np.int64)
    _overlap_errors(sizes, energy, np.zeros((k_ex, hp, wp)), 0, block, overlap, False, False,
                    errors)    # no overlap yet: every window is a candidate (error 0)
    placements = np.empty((ny, nx, 3), np.int64)
    for r in range(ny):
        for c in range(nx):
            py, px = r * step, c * step
            has_left, has_top = c > 0, r > 0
            threshold = 0
            if has_left or has_top:
                t2 = _fill_template(canvas, py, px, block, overlap, has_left, has_top, tmpl)
                # Zero-padding the template to the exemplar size makes the circular correlation
                # equal the linear one on every valid window (no wrap-around).
                ft = np.fft.fft(np.fft.rfft(tmpl, n=wp, axis=2), n=hp, axis=1)
                _cross_spectrum(fe, ft, spectrum)
                corr = np.fft.irfft2(spectrum, s=(hp, wp))
                best = _overlap_errors(sizes, energy, corr, t2, block, overlap, has_left,
                                       has_top, errors)
                threshold = best + math.floor(best * tol)
            slot = rng.slot(rng.STREAM_TEXSYN, first_slot + r * nx + c)
            _place_block(canvas, ex, errors, threshold, py, px, block, overlap, has_left,
                         has_top, seed, sample, slot, placements[r, c])
    out = canvas[:h, :w].copy()
    return (out, placements) if return_placements else out


def fit_source(image: np.ndarray, exemplar: int) -> np.ndarray:
    """The tiny-image rule: upscale (bicubic, aspect kept) so the shorter side is >= exemplar."""
    h, w = image.shape[:2]
    if min(h, w) >= exemplar:
        return image
    f = exemplar / min(h, w)
    nh, nw = max(exemplar, math.ceil(h * f)), max(exemplar, math.ceil(w * f))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))


def exemplar_boxes(hw, exemplar: int, *, seed: int, sample: int) -> tuple[tuple, tuple]:
    """(top, left) of the central and the random exemplar crop in an image of size hw (fitted)."""
    h, w = hw
    central = ((h - exemplar) // 2, (w - exemplar) // 2)
    rand = (rng.randint(seed, 0, sample, rng.slot(rng.STREAM_TEXSYN, 0), 0, h - exemplar),
            rng.randint(seed, 0, sample, rng.slot(rng.STREAM_TEXSYN, 1), 0, w - exemplar))
    return central, rand


def synthesize(image: np.ndarray, size: int = PAPER_SIZE, *, exemplar: int = PAPER_EXEMPLAR,
               block: int | None = None, overlap: int | None = None, tol: float = 0.1,
               seed: int = 0, sample: int = 0) -> np.ndarray:
    """The paper's recipe: quilt a size x size texture from the central and a random
    exemplar x exemplar crop of `image` (uint8 [H, W, 3]; tiny images: see fit_source)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if exemplar < 2:
        raise ValueError(f"exemplar size must be >= 2, got {exemplar}")
    d_block, d_overlap = default_block(exemplar)
    block = d_block if block is None else block
    overlap = d_overlap if overlap is None else overlap
    image = fit_source(image, exemplar)
    crops = [image[t:t + exemplar, l:l + exemplar]
             for t, l in exemplar_boxes(image.shape[:2], exemplar, seed=seed, sample=sample)]
    return quilt(crops, size, block=block, overlap=overlap, tol=tol, seed=seed, sample=sample,
                 first_slot=CROP_SLOTS)
