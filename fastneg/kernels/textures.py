"""Texture-based non-semantic negatives: a random resized crop and flip of each sample's texture.

For sample i: box = RandomResizedCrop box of bank[ids[i]] (fastneg.kernels.crop, torchvision's
sampling rule), resized to size x size by bilinear interpolation with align_corners=False and
no antialiasing, then flipped left-right with probability 1/2.

Random draws (fastneg.kernels.rng; `sample` = row index in the batch, `step` = training step):

    slot(STREAM_TEXTURE, 0 .. SLOTS_PER_BOX - 1)   the crop box (crop.rrc_box)
    slot(STREAM_TEXTURE, SLOTS_PER_BOX)            flip when uniform < 0.5

Bilinear in exact integers: output pixel o of a length-L source run samples at
(o + 1/2) L / S - 1/2 = ((2o + 1) L - S) / 2S (clamped at 0, like torch), so the two taps and
their weights are integers over 2S, and each output value is the weighted sum of four pixels
(an integer) divided by (2S)^2, rounded half up. Integer arithmetic gives the same bits on every
target, in any order (no float op order or FMA contraction to agree on), and stays within one
level of torch's float bilinear. The division is a multiply-shift by a precomputed reciprocal,
exact for sums below 2**31, hence size <= MAX_SIZE.
"""
from __future__ import annotations

import functools
import math
import numbers

import numba
import numpy as np
import torch

from fastneg.kernels import crop, rng
from fastneg.kernels.jit import cached_njit
from fastneg.kernels.patch import overlaps

SLOT_BOX = rng.slot(rng.STREAM_TEXTURE, 0)
SLOT_FLIP = SLOT_BOX + crop.SLOTS_PER_BOX
PARAMS = 5   # per sample: top, left, height, width, flip
MAX_SIZE = 1024   # keeps the integer bilinear sums below 2**31 (exact division; module docstring)


# _draw_params, _tap, _divide and _blend are plain Python compiled per target
# (_compile_helpers); their globals `_rrc_box`, `_uniform` and `_divide` are bound then.
def _draw_params(seed, step, sample, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params):
    """params[:] = (top, left, height, width, flip) of one sample's crop of an h x w texture."""
    top, left, ch, cw = _rrc_box(seed, step, sample, SLOT_BOX, h, w, scale_lo, scale_hi,
                                 logr_lo, logr_hi)
    params[0] = top
    params[1] = left
    params[2] = ch
    params[3] = cw
    params[4] = 1 if _uniform(seed, step, sample, SLOT_FLIP) < 0.5 else 0


def _tap(o, length, size):
    """(i0, i1, w1): output index o of `size` reads source i0 with weight (2 size - w1) / 2 size
    and i1 with weight w1 / 2 size (bilinear, align_corners=False)."""
    num = (2 * o + 1) * length - size
    if num < 0:
        num = 0
    i0 = num // (2 * size)
    i1 = i0 + 1 if i0 < length - 1 else i0
    return i0, i1, num - i0 * (2 * size)


def _divide(num, magic, shift):
    """num // (2 size)**2 for 0 <= num < 2**31, as (num * magic) >> shift (see reciprocal)."""
    return (np.uint64(num) * magic) >> shift


def _blend(p00, p01, p10, p11, wx, wy, den, magic, shift):
    """Bilinear value of pixels p[row][column], weights wx / den (column 1), wy / den (row 1)."""
    column0 = (den - wy) * np.int64(p00) + wy * np.int64(p10)
    column1 = (den - wy) * np.int64(p01) + wy * np.int64(p11)
    return _divide((den - wx) * column0 + wx * column1 + den * den // 2, magic, shift)


def reciprocal(size):
    """(magic, shift) as uint64 with (n * magic) >> shift == n // D for 0 <= n < 2**31, where
    D = (2 size)**2: with shift = 31 + bit_length(D - 1) and magic = ceil(2**shift / D), the
    error n * (magic - 2**shift / D) / 2**shift stays below 1 / D, too little to cross an
    integer, and n * magic stays below 2**63."""
    total = (2 * size) ** 2
    shift = 31 + (total - 1).bit_length()
    return np.uint64(-(-(1 << shift) // total)), np.uint64(shift)


def _compile_helpers(jit, uniform, rrc_box):
    names = {"_uniform": uniform, "_rrc_box": rrc_box}
    names["_divide"] = jit(rng._rebind(_divide, names))
    return (jit(rng._rebind(_draw_params, names)), jit(rng._rebind(_tap, names)),
            names["_divide"], jit(rng._rebind(_blend, names)))


_draw_params_cpu, _tap_cpu, _divide_cpu, _ = _compile_helpers(
    numba.njit(inline="always"), rng.uniform_cpu, crop.rrc_box_cpu)


@cached_njit(parallel=True)
def _textures_cpu(bank, ids, out, params, taps, mixed, seed, step, scale_lo, scale_hi, logr_lo,
                  logr_hi, magic, shift):
    """Scratch: taps int64 [N, size, 3] (per output column: the two source offsets in a row and
    the weight), mixed int64 [N, w * 3] (the two source rows of one output row, mixed)."""
    n, size = out.shape[0], out.shape[1]
    banks, h, w = bank.shape[0], bank.shape[1], bank.shape[2]
    den = 2 * size
    half = den * den // 2
    # One task per sample, separable: each output row mixes its two source rows once over the
    # crop's width, then every output pixel mixes two of those (2.5x faster than four-pixel taps).
    for i in numba.prange(n):
        _draw_params_cpu(seed, step, i, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params[i])
        top, left, ch, cw, flip = (params[i, 0], params[i, 1], params[i, 2], params[i, 3],
                                   params[i, 4])
        b = ids[i]
        if b < 0 or b >= banks:            # only reachable with check_ids=False
            out[i] = 0
            continue
        for ox in range(size):
            x0, x1, wx = _tap_cpu(ox, cw, size)
            col = size - 1 - ox if flip else ox
            taps[i, col, 0] = 3 * x0
            taps[i, col, 1] = 3 * x1
            taps[i, col, 2] = wx
        for oy in range(size):
            y0, y1, wy = _tap_cpu(oy, ch, size)
            for x in range(cw):
                for c in range(3):
                    mixed[i, 3 * x + c] = ((den - wy) * np.int64(bank[b, top + y0, left + x, c])
                                           + wy * np.int64(bank[b, top + y1, left + x, c]))
            for col in range(size):
                a0, a1, wx = taps[i, col, 0], taps[i, col, 1], taps[i, col, 2]
                for c in range(3):
                    out[i, oy, col, c] = _divide_cpu(
                        (den - wx) * mixed[i, a0 + c] + wx * mixed[i, a1 + c] + half, magic, shift)


@cached_njit()
def _draw_all_cpu(seed, step, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params):
    for i in range(params.shape[0]):
        _draw_params_cpu(seed, step, i, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params[i])


# CUDA kernel sources: plain Python whose globals `cuda`, `_draw`, `_tap_dev` and `_blend_dev` are
# bound by cuda_kernels(). Both loop grid-stride, so any launch shape covers the whole batch.
def _params_kernel(seed, step, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params):
    for i in range(cuda.grid(1), params.shape[0], cuda.gridsize(1)):  # noqa: F821
        _draw(seed, step, i, h, w, scale_lo, scale_hi, logr_lo, logr_hi, params[i])  # noqa: F821


def _resample_kernel(bank, ids, out, params, magic, shift):
    """One block row per output row, one thread per output pixel."""
    n, size = out.shape[0], out.shape[1]
    den = 2 * size
    block, thread, grid = cuda.blockIdx, cuda.threadIdx, cuda.gridDim  # noqa: F821
    width = cuda.blockDim.x  # noqa: F821
    for row in range(block.x, n * size, grid.x):
        i = row // size
        oy = row - i * size
        b = ids[i]
        top, left, ch, cw, flip = (params[i, 0], params[i, 1], params[i, 2], params[i, 3],
                                   params[i, 4])
        y0, y1, wy = _tap_dev(oy, ch, size)  # noqa: F821
        for ox in range(block.y * width + thread.x, size, grid.y * width):
            col = size - 1 - ox if flip else ox
            x0, x1, wx = _tap_dev(ox, cw, size)  # noqa: F821
            for c in range(3):
                if b < 0 or b >= bank.shape[0]:    # only reachable with check_ids=False
                    out[i, oy, col, c] = 0
                else:
                    out[i, oy, col, c] = _blend_dev(  # noqa: F821
                        bank[b, top + y0, left + x0, c], bank[b, top + y0, left + x1, c],
                        bank[b, top + y1, left + x0, c], bank[b, top + y1, left + x1, c],
                        wx, wy, den, magic, shift)


def cuda_kernel_sources():
    """(params_kernel, resample_kernel) as plain Python with their device functions bound, for
    numba.cuda.jit or for compile_ptx against a real target. Imports numba.cuda."""
    from numba import cuda
    _, uniform, _ = rng.cuda_functions()
    draw, tap, _, blend = _compile_helpers(rng.cuda_device_jit(), uniform,
                                           crop.rrc_box_cuda())
    names = {"cuda": cuda, "_draw": draw, "_tap_dev": tap, "_blend_dev": blend}
    return rng._rebind(_params_kernel, names), rng._rebind(_resample_kernel, names)


@functools.cache
def cuda_kernels():
    """(params_kernel, resample_kernel) compiled for numba.cuda, which is imported only here."""
    from numba import cuda
    return tuple(cuda.jit(f) for f in cuda_kernel_sources())


def _log_ratio(scale, ratio):
    """(scale_lo, scale_hi, log ratio_lo, log ratio_hi) as floats, or ValueError."""
    try:
        s0, s1 = (float(v) for v in scale)
        r0, r1 = (float(v) for v in ratio)
    except (TypeError, ValueError):
        raise ValueError(f"scale and ratio must be pairs of numbers, got scale={scale!r}, "
                         f"ratio={ratio!r}") from None
    if not (0 < s0 <= s1) or not (0 < r0 <= r1):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                         f"got scale={scale}, ratio={ratio}")
    return s0, s1, math.log(r0), math.log(r1)


def draw_texture_params(n, h, w, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed, step=0):
    """The draws the kernels use for samples 0..n-1 and H x W textures, for inspection and tests:
    int32 [n, 5] rows of (top, left, height, width, flip)."""
    bounds = _log_ratio(scale, ratio)
    seed, step = rng.check_counter("seed", seed), rng.check_counter("step", step)
    params = np.empty((n, PARAMS), np.int32)
    _draw_all_cpu(seed, step, h, w, *bounds, params)
    return params


def sample_textures(bank, ids, *, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed, step=0,
                    out=None, check_ids=True):
    """out[i] = random resized crop (bilinear) and random flip of bank[ids[i]] (module docstring).

    bank: uint8 [B, h, w, 3] on the CPU or a CUDA device; ids: int64 [N] on the same device;
    out (optional): uint8 [N, size, size, 3] there too. Any strides. Returns out.
    check_ids=False skips the id range check, which on CUDA costs one host sync; an id out of
    range then gives a black texture instead of an error (the kernels never read outside bank).
    """
    if not isinstance(bank, torch.Tensor) or not isinstance(ids, torch.Tensor):
        raise ValueError("bank and ids must be torch tensors")
    if bank.dtype != torch.uint8 or bank.dim() != 4 or bank.shape[3] != 3:
        raise ValueError(f"bank must be uint8 [B, h, w, 3], got {bank.dtype} {tuple(bank.shape)}")
    if bank.shape[0] == 0 or bank.shape[1] == 0 or bank.shape[2] == 0:
        raise ValueError(f"bank is empty: shape {tuple(bank.shape)}")
    if bank.device.type not in ("cpu", "cuda"):
        raise ValueError(f"bank must be on the CPU or a CUDA device, got {bank.device}")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"ids must be int64 [N], got {ids.dtype} {tuple(ids.shape)}")
    if ids.device != bank.device:
        raise ValueError(f"ids are on {ids.device} but bank is on {bank.device}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) \
            or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [1, {MAX_SIZE}], got {size!r}")
    bounds = _log_ratio(scale, ratio)
    seed, step = rng.check_counter("seed", seed), rng.check_counter("step", step)
    n = ids.shape[0]
    shape = (n, int(size), int(size), 3)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=bank.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != shape \
            or out.dtype != torch.uint8 or out.device != bank.device:
        raise ValueError(f"out must be uint8 {list(shape)} on {bank.device}")
    if overlaps(out, bank) or overlaps(out, ids):
        raise ValueError("out overlaps bank or ids")
    if n == 0:
        return out
    if check_ids:
        lowest, highest = torch.aminmax(ids)
        lowest, highest = int(lowest), int(highest)
        if lowest < 0 or highest >= bank.shape[0]:
            bad = lowest if lowest < 0 else highest
            raise ValueError(f"ids must lie in [0, {bank.shape[0] - 1}] (bank size "
                             f"{bank.shape[0]}), got {bad}")
    if bank.is_cuda:
        _textures_cuda(bank, ids, out, bounds, seed, step)
    else:
        params = np.empty((n, PARAMS), np.int32)
        taps = np.empty((n, int(size), 3), np.int64)
        mixed = np.empty((n, bank.shape[2] * 3), np.int64)
        _textures_cpu(bank.numpy(), ids.numpy(), out.numpy(), params, taps, mixed, seed, step,
                      *bounds, *reciprocal(int(size)))
    return out


def launch_cuda(bank, ids, out, params, bounds, seed, step, stream=0, blocks=None, threads=128):
    """Launch both CUDA kernels on cuda-array-likes (torch via as_cuda_array, or simulator arrays).

    params: int32 [N, 5] scratch; bounds: (scale_lo, scale_hi, log ratio_lo, log ratio_hi);
    blocks: (rows, chunks) of the resample grid, default one block per output row.
    """
    params_kernel, resample_kernel = cuda_kernels()
    n, size = out.shape[0], out.shape[1]
    magic, shift = reciprocal(size)
    params_kernel[(n + 63) // 64, 64, stream](seed, step, bank.shape[1], bank.shape[2], *bounds,
                                              params)
    if blocks is None:
        blocks = (n * size, (size + threads - 1) // threads)
    resample_kernel[blocks, threads, stream](bank, ids, out, params, magic, shift)


def _textures_cuda(bank, ids, out, bounds, seed, step):
    from numba import cuda
    as_array = functools.partial(cuda.as_cuda_array, sync=False)   # sync=True would block the host
    params = torch.empty((ids.shape[0], PARAMS), dtype=torch.int32, device=bank.device)
    with cuda.gpus[bank.device.index]:
        # inside the device's context (see patch._patch_cuda)
        stream = cuda.external_stream(torch.cuda.current_stream(bank.device).cuda_stream)
        launch_cuda(as_array(bank), as_array(ids), as_array(out), as_array(params), bounds, seed,
                    step, stream)
