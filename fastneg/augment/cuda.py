"""The fused CUDA back end of fastneg.augment: aug-plus on a whole batch in one Numba CUDA kernel,
the GPU twin of fastneg.augment.cpu (same inputs, the same pixel formulas from
fastneg.augment.pixels, same op order; results agree within float rounding).
fastneg.augment.torch_ops stays the reference.

One launch per view-batch; one thread block per sample (grid-stride over the batch), its threads
over the sample's pixels:

    pass 1  (only if contrast is on) load, the jitter ops before contrast, grey sum; one block
            reduction (float64, fixed order) gives the grey mean contrast blends towards
    pass 2  load + flip, the jitter ops in the sample's order, grayscale; then normalize into
            the output, or (blurred samples) store the float pixel in a scratch image
    pass 3  (blurred samples only) horizontal blur row by row through shared memory, in place
            in the scratch image; then the vertical blur, normalized into the output

Flip is applied at load (it commutes with every op, as in the CPU kernel). Ops at their identity
(factor 1, hue shift 0) are skipped. The output is float32 NHWC memory, i.e. the [N, 3, H, W]
channels_last tensor apply() returns; other dtypes are one torch cast after it.

Limits: width <= MAX_WIDTH (the shared row buffer); apply() uses the torch path beyond it.
numba.cuda is imported only when the kernel is first needed.
"""
from __future__ import annotations

import functools

import numpy as np

from fastneg.augment import pixels
from fastneg.augment.pixels import ZERO
from fastneg.kernels.augment_ops import CONTRAST, SATURATION

# Flag columns of the uint8 [N, 4] flags array, as in fastneg.augment.cpu.
FLIP, JITTER, GRAY, BLUR = range(4)
THREADS = 512           # threads per block (the default launch; at most this many). At the
                        # kernel's 96 registers (sm_90, ptxas; docs/gpu.md) one block fits
                        # an SM: 25% occupancy, to be tuned on a GPU
MAX_WIDTH = 1024        # the shared row buffer holds 3 planes of this many float32 pixels
# numba-cuda types a shared array's shape only from an integer literal or a global constant:
# `3 * MAX_WIDTH` written in the kernel types as int64 and fails type inference on a real target.
ROW_FLOATS = 3 * MAX_WIDTH


# Kernel source: plain Python compiled by cuda_kernel_source(), which binds `cuda` and the
# device functions of fastneg.augment.pixels (_identity, _jitter, _grey, _reflect) as its globals.
def _kernel(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift, scratch, out):
    """aug-plus of uint8 x [N, H, W, 3] into float32 out [N, H, W, 3]; arguments as
    fastneg.augment.cpu.fused_aug_plus, scratch float32 [N, H, 3, W] (rows of blurred samples)."""
    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    tid = cuda.threadIdx.x  # noqa: F821
    threads = cuda.blockDim.x  # noqa: F821
    partial = cuda.shared.array(THREADS, np.float64)  # noqa: F821
    row = cuda.shared.array(ROW_FLOATS, np.float32)  # noqa: F821
    n_pixels = h * w
    for i in range(cuda.blockIdx.x, n, cuda.gridDim.x):  # noqa: F821
        flip = flags[i, FLIP] != 0
        jitter = flags[i, JITTER] != 0
        gray = flags[i, GRAY] != 0
        blur = flags[i, BLUR] != 0
        at_contrast = -1
        if jitter and not _identity(CONTRAST, factors[i, CONTRAST]):  # noqa: F821
            for j in range(4):
                if order[i, j] == CONTRAST:
                    at_contrast = j
        # pass 1: the grey mean of the image as it stands before contrast
        mean = ZERO
        if at_contrast >= 0:
            total = 0.0
            for p in range(tid, n_pixels, threads):
                y = p // w
                c0 = p - y * w
                r = np.float32(x[i, y, c0, 0])
                g = np.float32(x[i, y, c0, 1])
                b = np.float32(x[i, y, c0, 2])
                for j in range(at_contrast):
                    op = order[i, j]
                    f = factors[i, op]
                    if not _identity(op, f):  # noqa: F821
                        r, g, b = _jitter(r, g, b, op, f, ZERO, luma)  # noqa: F821
                total += _grey(r, g, b, luma)  # noqa: F821
            partial[tid] = total
            cuda.syncthreads()  # noqa: F821
            if tid == 0:
                s = 0.0
                for t in range(threads):
                    s += partial[t]
                partial[0] = s
            cuda.syncthreads()  # noqa: F821
            mean = np.float32(partial[0] / n_pixels)
            cuda.syncthreads()  # noqa: F821   (partial is reused by the next sample)
        # pass 2: every op but the blur, per pixel
        for p in range(tid, n_pixels, threads):
            y = p // w
            c0 = p - y * w
            src = w - 1 - c0 if flip else c0
            r = np.float32(x[i, y, src, 0])
            g = np.float32(x[i, y, src, 1])
            b = np.float32(x[i, y, src, 2])
            if jitter:
                for j in range(4):
                    op = order[i, j]
                    f = factors[i, op]
                    if not _identity(op, f):  # noqa: F821
                        r, g, b = _jitter(r, g, b, op, f, mean, luma)  # noqa: F821
            if gray:
                r, g, b = _jitter(r, g, b, SATURATION, ZERO, mean, luma)  # noqa: F821
            if blur:
                scratch[i, y, 0, c0] = r
                scratch[i, y, 1, c0] = g
                scratch[i, y, 2, c0] = b
            else:
                out[i, y, c0, 0] = r * scale[0] + shift[0]
                out[i, y, c0, 1] = g * scale[1] + shift[1]
                out[i, y, c0, 2] = b * scale[2] + shift[2]
        if not blur:
            continue
        cuda.syncthreads()  # noqa: F821
        # pass 3a: horizontal blur, one row (3 planes) at a time through shared memory
        kw = kernel_x.shape[1]
        rx = kw // 2
        for y in range(h):
            for t in range(tid, 3 * w, threads):
                c = t // w
                row[t] = scratch[i, y, c, t - c * w]
            cuda.syncthreads()  # noqa: F821
            for t in range(tid, 3 * w, threads):
                c = t // w
                c0 = t - c * w
                acc = ZERO
                for k in range(kw):
                    acc += kernel_x[i, k] * row[c * w + _reflect(c0 + k - rx, w)]  # noqa: F821
                scratch[i, y, c, c0] = acc
            cuda.syncthreads()  # noqa: F821
        # pass 3b: vertical blur and normalize
        kh = kernel_y.shape[1]
        ry = kh // 2
        for t in range(tid, 3 * n_pixels, threads):
            y = t // (3 * w)
            rest = t - y * 3 * w
            c0 = rest // 3
            c = rest - c0 * 3
            acc = ZERO
            for k in range(kh):
                acc += kernel_y[i, k] * scratch[i, _reflect(y + k - ry, h), c, c0]  # noqa: F821
            out[i, y, c0, c] = acc * scale[c] + shift[c]
        cuda.syncthreads()  # noqa: F821   (the next sample may reuse shared memory)


def cuda_kernel_source():
    """The kernel as plain Python with its device functions bound (for numba.cuda.jit, or for
    compile_ptx against a real target in the tests). Imports numba.cuda."""
    from numba import cuda

    from fastneg.kernels import rng
    names = {"cuda": cuda, **pixels.compile_pixels(rng.cuda_device_jit(), cuda=True)}
    return rng._rebind(_kernel, names)


@functools.cache
def cuda_kernel():
    """The kernel compiled for numba.cuda (imported here, on first use)."""
    from numba import cuda
    return cuda.jit(cuda_kernel_source())


def launch(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift, scratch, out,
           stream=0, blocks=None, threads=THREADS):
    """Launch the kernel on cuda-array-likes (torch via as_cuda_array, or simulator arrays).

    Shapes as fastneg.augment.cpu.fused_aug_plus, plus scratch float32 [N, H, 3, W]; W <= MAX_WIDTH.
    blocks: default one per sample (up to 65535, then grid-stride); threads <= THREADS.
    """
    n, w = x.shape[0], x.shape[2]
    if w > MAX_WIDTH:
        raise ValueError(f"width {w} > MAX_WIDTH {MAX_WIDTH}")
    if not 1 <= threads <= THREADS:
        raise ValueError(f"threads must be in [1, {THREADS}], got {threads}")
    if n == 0:
        return
    blocks = blocks or min(n, 65535)
    cuda_kernel()[blocks, threads, stream](x, flags, factors, order, kernel_x, kernel_y, luma,
                                           scale, shift, scratch, out)


def fused_aug_plus_cuda(x, flags, factors, order, kernel_x, kernel_y, luma, scale, shift):
    """The kernel on CUDA torch tensors, on torch's current stream, without host syncs.

    x uint8 [N, H, W, 3] on one CUDA device (any strides); the rest on that device, as
    fastneg.augment.cpu.fused_aug_plus takes them. Returns float32 [N, H, W, 3] (contiguous).
    """
    import torch
    from numba import cuda
    n, h, w, _ = x.shape
    out = torch.empty((n, h, w, 3), dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    scratch = torch.empty((n, h, 3, w), dtype=torch.float32, device=x.device)
    as_array = functools.partial(cuda.as_cuda_array, sync=False)   # sync=True would block
    with cuda.gpus[x.device.index]:
        # inside the device's context (see kernels.patch._patch_cuda)
        stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
        launch(*(as_array(t) for t in (x, flags, factors, order, kernel_x, kernel_y, luma,
                                       scale, shift, scratch, out)), stream=stream)
    return out
