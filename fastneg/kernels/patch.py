"""Patch-based non-semantic negatives (docs/method.md), one algorithm for CPU (Numba) and CUDA.

Per sample i of the batch: a patch size d ~ U{lo..hi}; a grid of n_h = H // d + 1 by
n_w = W // d + 1 tiles; tile k = ty * n_w + tx receives the d x d window of the input whose
top-left corner (y_k, x_k) is drawn uniformly with 0 <= y_k < H - d, 0 <= x_k < W - d (with
replacement); the canvas is cropped to H x W. So every output pixel is a gather,

    out[r, c] = x[y_k + r % d, x_k + c % d],   k = (r // d) * n_w + c // d,

and the kernels write each output element exactly once, without a canvas: first a small table
of corners per sample, then the copy.

mode="permute" is the jigsaw ablation the authors tried first: the (H // d) x (W // d) grid of
full tiles is shuffled (Fisher-Yates); the strips past the last full tile (narrower than d) stay
where they are.

Random draws (fastneg.kernels.rng; `sample` = row index in the batch, `step` = training step):

    slot(STREAM_PATCH, 0)         d
    slot(STREAM_PATCH, 1 + 2k)    y_k                          mode="sample"
    slot(STREAM_PATCH, 2 + 2k)    x_k                          mode="sample"
    slot(STREAM_PATCH, 1 + j)     swap partner of grid tile j  mode="permute"

The kernels only move elements, so they move raw bytes: the tensor is viewed in memory order as
[N, P, H, row_bytes] (P = 1 when channels are innermost, P = C for planar NCHW memory). One
compiled function serves every dtype and both layouts, and bfloat16/float16 values travel
bit for bit.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from fastneg.kernels import rng
from fastneg.kernels.jit import cached_njit

LAYOUTS = ("nchw", "nhwc")
MODES = ("sample", "permute")
# The kernels copy bytes, so any real dtype would do; these are the ones accepted (and tested).
DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64)
SLOT_D = rng.slot(rng.STREAM_PATCH, 0)


# _draw_tiles is plain Python compiled per target; its global `_randint` is bound then.
def _draw_tiles(seed, step, sample, h, w, lo, hi, permute, tiles):
    """Fill tiles[k] = (y_k, x_k) for the n_h x n_w tiles of one sample; return d."""
    d = _randint(seed, step, sample, SLOT_D, lo, hi)
    nh = h // d + 1
    nw = w // d + 1
    if not permute:
        for k in range(nh * nw):
            tiles[k, 0] = _randint(seed, step, sample, SLOT_D + 1 + 2 * k, 0, h - d - 1)
            tiles[k, 1] = _randint(seed, step, sample, SLOT_D + 2 + 2 * k, 0, w - d - 1)
        return d
    gh = nh - 1
    gw = nw - 1
    m = gh * gw
    # Column 1 of rows 0..m-1 holds the permutation of grid tiles while it is drawn.
    for j in range(m):
        tiles[j, 1] = j
    for j in range(m - 1, 0, -1):
        r = _randint(seed, step, sample, SLOT_D + 1 + j, 0, j)
        t = tiles[j, 1]
        tiles[j, 1] = tiles[r, 1]
        tiles[r, 1] = t
    # Grid tile j sits at table row k >= j; going down from m-1 only overwrites consumed entries.
    for j in range(m - 1, -1, -1):
        source = tiles[j, 1]
        k = (j // gw) * nw + j % gw
        tiles[k, 0] = (source // gw) * d
        tiles[k, 1] = (source % gw) * d
    for ty in range(nh):                   # right strip stays in place
        tiles[ty * nw + gw, 0] = ty * d
        tiles[ty * nw + gw, 1] = gw * d
    for tx in range(gw):                   # bottom strip stays in place
        tiles[gh * nw + tx, 0] = gh * d
        tiles[gh * nw + tx, 1] = tx * d
    return d


_draw_tiles_cpu = numba.njit(inline="always")(
    rng._rebind(_draw_tiles, {"_randint": rng.randint_cpu}))


@cached_njit()
def _draw_all_cpu(seed, step, h, w, lo, hi, permute, tiles, sizes):
    for i in range(sizes.shape[0]):
        sizes[i] = _draw_tiles_cpu(seed, step, i, h, w, lo, hi, permute, tiles[i])


def draw_patch_tiles(n, h, w, *, patch_range=(16, 72), seed, step=0, mode="sample"):
    """The draws the kernels use for samples 0..n-1 of an H x W batch, for inspection and tests:
    (d: int32 [n], corners: int32 [n, max_tiles, 2]); row k of corners[i] is (y_k, x_k) of tile k
    of the n_h x n_w grid for d[i] (rows past the grid are zero)."""
    geometry = patch_geometry((n, h, w, 1), "nhwc", patch_range, mode)
    seed, step = rng.check_counter("seed", seed), rng.check_counter("step", step)
    tiles = np.zeros((n, geometry.max_tiles, 2), np.int32)
    sizes = np.empty(n, np.int32)
    _draw_all_cpu(seed, step, h, w, geometry.lo, geometry.hi, geometry.permute, tiles, sizes)
    return sizes, tiles


@intrinsic
def _copy_bytes(typingctx, dst, dst_start, src, src_start, count):
    """memcpy(&dst[dst_start], &src[src_start], count) for byte arrays, without bounds checks.

    Spans are d * q bytes (48..216 for uint8 RGB at the paper's d = 16..72). Numba's element loop
    over them does not vectorise (index wrap-around checks); LLVM's memcpy does: the CPU kernel
    measured ~3x faster with it.
    """
    def codegen(context, builder, signature, args):
        def byte_pointer(array_type, array, start):
            data = context.make_array(array_type)(context, builder, array).data
            return builder.gep(builder.bitcast(data, cgutils.voidptr_t), [start])
        cgutils.raw_memcpy(builder, byte_pointer(signature.args[0], args[0], args[1]),
                           byte_pointer(signature.args[2], args[2], args[3]), args[4], 1)
        return context.get_dummy_value()
    return types.void(dst, types.intp, src, types.intp, types.intp), codegen


@cached_njit(parallel=True)
def _patch_cpu(src, out, tiles, sizes, seed, step, planes, h, w, q, lo, hi, permute):
    """src, out: flat uint8 memory of [N, P, H, W * q] (q = bytes per pixel within a row)."""
    row_bytes = w * q
    # One task per sample, draws and copy together: at batch 64 that is 64 tasks of ~8 us on
    # 2 cores; one task per band of d rows (~1,000 tasks of <1 us) cost more in scheduling than
    # it gained in balance (uint8 NHWC 64 x 224^2: 0.47 -> 0.25 ms, float32 NCHW unchanged).
    for i in numba.prange(sizes.shape[0]):
        d = _draw_tiles_cpu(seed, step, i, h, w, lo, hi, permute, tiles[i])
        sizes[i] = d
        nw = w // d + 1
        for ty in range(h // d + 1):
            if ty * d >= h:
                break
            rows = min(d, h - ty * d)
            # Tile by tile: a tile's d source rows are a constant-stride stream that the
            # prefetcher follows (row by row, every span jumped to a random source row and the
            # kernel ran 2-3x slower).
            for p in range(planes):
                plane = (i * planes + p) * h
                for tx in range(nw):
                    c0 = tx * d
                    if c0 >= w:
                        break
                    k = ty * nw + tx
                    out_start = (plane + ty * d) * row_bytes + c0 * q
                    src_start = (plane + tiles[i, k, 0]) * row_bytes + tiles[i, k, 1] * q
                    span = min(d, w - c0) * q
                    for dy in range(rows):
                        _copy_bytes(out, out_start + dy * row_bytes,
                                    src, src_start + dy * row_bytes, span)


# CUDA kernel sources: plain Python whose globals `cuda` and `_draw` are bound by cuda_kernels()
# (numba.cuda and the device version of _draw_tiles). Both loop grid-stride, so any launch shape
# covers the whole batch (the simulator tests use tiny grids).
def _draw_kernel(seed, step, h, w, lo, hi, permute, tiles, sizes):
    for i in range(cuda.grid(1), sizes.shape[0], cuda.gridsize(1)):  # noqa: F821
        sizes[i] = _draw(seed, step, i, h, w, lo, hi, permute, tiles[i])  # noqa: F821


def _gather_kernel(src, out, tiles, sizes, w, words_per_pixel):
    """src, out: [N, P, H, row_words]. Block rows walk image rows, block columns walk
    (sample, plane) pairs; in a block each warp (threadIdx.y) copies whole tile spans and its
    lanes (threadIdx.x) consecutive words of a span: coalesced, and no division per element."""
    planes, h = out.shape[1], out.shape[2]
    lane, warp = cuda.threadIdx.x, cuda.threadIdx.y  # noqa: F821
    lanes, warps = cuda.blockDim.x, cuda.blockDim.y  # noqa: F821
    for plane in range(cuda.blockIdx.y, out.shape[0] * planes, cuda.gridDim.y):  # noqa: F821
        i = plane // planes
        p = plane - i * planes
        d = sizes[i]
        nw = w // d + 1
        for r in range(cuda.blockIdx.x, h, cuda.gridDim.x):  # noqa: F821
            ty = r // d
            dy = r - ty * d
            for tx in range(warp, nw, warps):
                k = ty * nw + tx
                sy = tiles[i, k, 0] + dy
                out_start = tx * d * words_per_pixel
                src_start = tiles[i, k, 1] * words_per_pixel
                for j in range(lane, min(d, w - tx * d) * words_per_pixel, lanes):
                    out[i, p, r, out_start + j] = src[i, p, sy, src_start + j]


def cuda_kernel_sources():
    """(draw_kernel, gather_kernel) as plain Python with their device functions bound, for
    numba.cuda.jit or for compile_ptx against a real target. Imports numba.cuda."""
    from numba import cuda
    _, _, randint = rng.cuda_functions()
    names = {"cuda": cuda}
    names["_draw"] = rng.cuda_device_jit()(
        rng._rebind(_draw_tiles, {"_randint": randint}))
    return rng._rebind(_draw_kernel, names), rng._rebind(_gather_kernel, names)


@functools.cache
def cuda_kernels():
    """(draw_kernel, gather_kernel) compiled for numba.cuda, which is imported only here."""
    from numba import cuda
    return tuple(cuda.jit(f) for f in cuda_kernel_sources())


class PatchGeometry(NamedTuple):
    """Validated geometry of one call: what both targets need besides the arrays."""
    h: int
    w: int
    lo: int
    hi: int
    permute: bool
    max_tiles: int    # tiles of the largest grid (d = lo): rows of the per-sample corner table


def patch_geometry(shape, layout, patch_range, mode):
    """PatchGeometry for a 4-D `shape` in `layout`, or ValueError naming the bad argument."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(shape) != 4:
        raise ValueError(f"x must be 4-D ({layout.upper()}), got shape {tuple(shape)}")
    h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    if not (isinstance(patch_range, (tuple, list)) and len(patch_range) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in patch_range)):
        raise ValueError(f"patch_range must be two integers (lo, hi), got {patch_range!r}")
    lo, hi = int(patch_range[0]), int(patch_range[1])
    if not 1 <= lo <= hi <= min(h, w) - 1:
        raise ValueError(f"patch_range {tuple(patch_range)} must satisfy 1 <= lo <= hi <= "
                         f"min(H, W) - 1 = {min(h, w) - 1} for an input of H x W = {h} x {w}")
    max_tiles = (h // lo + 1) * (w // lo + 1)
    if 2 * max_tiles >= 1 << rng.SLOT_BITS:
        raise ValueError(f"patch_range lo={lo} makes {max_tiles} tiles on a {h} x {w} input, "
                         f"more than the RNG has slots for; raise lo")
    return PatchGeometry(h, w, lo, hi, mode == "permute", max_tiles)


def memory_rows(t, layout):
    """(uint8 [N, P, H, row_bytes] view of t's memory, bytes per pixel in a row), or None when
    t is not dense in either NHWC (channels innermost) or NCHW (planar) memory order."""
    nhwc = t if layout == "nhwc" else t.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        n, h, w, c = nhwc.shape
        return nhwc.reshape(n, 1, h, w * c).view(torch.uint8), c * t.element_size()
    nchw = t if layout == "nchw" else t.permute(0, 3, 1, 2)
    if nchw.is_contiguous():
        return nchw.view(torch.uint8), t.element_size()
    return None


def _byte_span(t):
    """[first, last] byte address that t can touch."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


def overlaps(a, b):
    """True when tensors a and b on one device have overlapping byte spans (may share memory)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 <= b1 and b0 <= a1


def patch_negatives(x, *, layout, patch_range=(16, 72), seed, step=0, out=None, mode="sample"):
    """Patch-based non-semantic negatives of a batch x (see the module docstring).

    x: [N, C, H, W] (layout="nchw") or [N, H, W, C] (layout="nhwc"), any real dtype, on the CPU
    or a CUDA device, dense in either contiguous or channels_last memory. out (optional): same
    shape, dtype, device and memory order as x, not overlapping it. Returns out. On CUDA the
    kernels run on torch's current stream without host synchronisation.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    geometry = patch_geometry(x.shape, layout, patch_range, mode)
    if x.dtype not in DTYPES:
        raise ValueError(f"x has unsupported dtype {x.dtype}; supported: {DTYPES}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"x must be on the CPU or a CUDA device, got {x.device}")
    seed, step = rng.check_counter("seed", seed), rng.check_counter("step", step)
    src_rows = memory_rows(x, layout)
    if src_rows is None:
        raise ValueError(f"x (shape {tuple(x.shape)}, strides {x.stride()}) must be dense in "
                         "contiguous or channels_last memory: call .contiguous() first")
    if out is None:
        out = torch.empty_like(x)   # keeps x's memory order
    elif not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype \
            or out.device != x.device:
        raise ValueError(f"out must be a tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} "
                         f"and device {x.device}")
    dst_rows = memory_rows(out, layout)
    if dst_rows is None or dst_rows[0].shape != src_rows[0].shape:
        raise ValueError("out must have the same memory order as x (both contiguous or both "
                         "channels_last)")
    if overlaps(x, out):
        raise ValueError("out overlaps x: the negatives gather from x, so need memory of their own")
    if x.shape[0] == 0:
        return out
    (src, q), dst = src_rows, dst_rows[0]
    if x.is_cuda:
        _patch_cuda(src, dst, geometry, q, seed, step)
    else:
        tiles = np.empty((x.shape[0], geometry.max_tiles, 2), np.int32)
        sizes = np.empty(x.shape[0], np.int32)
        _patch_cpu(src.numpy().reshape(-1), dst.numpy().reshape(-1), tiles, sizes, seed, step,
                   src.shape[1], geometry.h, geometry.w, q, geometry.lo, geometry.hi,
                   geometry.permute)
    return out


def _widest_unit(q, *tensors):
    """Largest of 8, 4, 2, 1 bytes that divides the pixel size and every base address: the CUDA
    kernel moves aligned words of this size, fewer and wider memory operations than bytes."""
    for unit in (8, 4, 2, 1):
        if q % unit == 0 and all(t.data_ptr() % unit == 0 for t in tensors):
            return unit
    return 1


_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def launch_cuda(src, out, tiles, sizes, geometry, q, seed, step, stream=0, blocks=None,
                threads=(32, 4)):
    """Launch both CUDA kernels on cuda-array-likes (torch via as_cuda_array, or simulator arrays).

    src, out: [N, P, H, row_words] arrays of words whose size divides q, the bytes per pixel in
    a row; tiles: int32 [N, max_tiles, 2]; sizes: int32 [N].
    blocks: gather grid (rows, sample-planes), default (H, N * P); threads: (lanes, warps).
    """
    draw_kernel, gather_kernel = cuda_kernels()
    n, planes, h = out.shape[0], out.shape[1], out.shape[2]
    words_per_pixel = q // out.dtype.itemsize
    draw_kernel[(n + 63) // 64, 64, stream](seed, step, geometry.h, geometry.w, geometry.lo,
                                            geometry.hi, geometry.permute, tiles, sizes)
    if blocks is None:
        blocks = (h, min(n * planes, 65535))   # 65535: CUDA's limit on gridDim.y
    gather_kernel[blocks, threads, stream](src, out, tiles, sizes, geometry.w, words_per_pixel)


def _patch_cuda(src, dst, geometry, q, seed, step):
    from numba import cuda
    unit = _widest_unit(q, src, dst)
    as_array = functools.partial(cuda.as_cuda_array, sync=False)   # sync=True would block the host
    n = src.shape[0]
    tiles = torch.empty((n, geometry.max_tiles, 2), dtype=torch.int32, device=src.device)
    sizes = torch.empty(n, dtype=torch.int32, device=src.device)
    with cuda.gpus[src.device.index]:
        # inside the device's context: wrapping torch's stream outside it would bind the stream
        # to whichever context is current (device 0's on every rank)
        stream = cuda.external_stream(torch.cuda.current_stream(src.device).cuda_stream)
        launch_cuda(as_array(src.view(_UNIT_DTYPES[unit])), as_array(dst.view(_UNIT_DTYPES[unit])),
                    as_array(tiles), as_array(sizes), geometry, q, seed, step, stream)
