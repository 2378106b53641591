"""MoCoV2Augment: MoCo-v2 "aug-plus" after the crop, on whole batches, on any device.

Loaders hand over geometric crops (uint8 [N, H, W, 3]); MoCoV2Augment does everything else
that aug-plus does to the pixels, per sample and for the whole batch at once:

    horizontal flip (p 0.5)
    ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p 0.8, the four ops
        in a random order per sample (torchvision's torch.randperm(4) rule)
    grayscale (p 0.2, torchvision's luma weights)
    Gaussian blur (p 0.5, sigma ~ U[0.1, 2.0], odd kernel ~10% of the side, separable, reflect)
    normalize (ImageNet mean/std) -> [N, 3, H, W], channels_last memory

    aug = MoCoV2Augment()
    params = aug.sample(n, seed=seed, step=step, view=0, device=x.device)   # the draws, as tensors
    q = aug.apply(x, params)        # [N, 3, H, W]; the query's texture NS: aug.apply(tex, params)

Draws (sample()): every random number comes from fastneg.kernels.rng, u32 = mix(seed, step,
sample, slot) with sample = `first + row` and slot = slot(STREAM_AUGMENT, view * SLOTS_PER_VIEW
+ k); k is one of the _COL_* constants below. Give each view of a pair its own `view` and each
DDP rank its own `first` (e.g. rank * n), so that no two images ever share draws unless asked to.

Pixels (apply()), three back ends of the same formulas, chosen by the images' device:
    CPU     fastneg.augment.cpu: one fused Numba kernel, each sample in at most three passes
    CUDA    fastneg.augment.cuda: one fused Numba CUDA launch per batch on torch's current
            stream (images wider than its MAX_WIDTH take the torch path)
    other   fastneg.augment.torch_ops: batched torch ops, the reference both kernels are
            tested against
The two kernels share their per-pixel formulas (fastneg.augment.pixels).

Numerics: each op follows torchvision.transforms.v2's float formulas (values clamped to the
valid range after every jitter op, as torchvision does), computed in float32 on the 0..255 scale
(1/255 folds into the normalization) without the uint8 rounding torchvision applies between ops
on uint8 images: the difference is below one grey level per op. The kernels skip ops at their
identity (exactly the identity); the torch path's exceptions are in its module doc. Output in
float32, bfloat16 or float16 (one cast after the float32 work).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numba
import numpy as np
import torch

from fastneg.augment import torch_ops
from fastneg.augment.torch_ops import _gaussian_kernels, blur_kernel_size
from fastneg.kernels import rng
from fastneg.kernels.augment_ops import IMAGENET_MEAN, IMAGENET_STD, LUMA
from fastneg.kernels.jit import cached_njit

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Slot k of each draw within one view; column k of the packed array that sample() fills.
_COL_FLIP, _COL_JITTER, _COL_BRIGHTNESS, _COL_CONTRAST, _COL_SATURATION, _COL_HUE = range(6)
_COL_ORDER = 6                           # 4 columns (a permutation), from 3 Fisher-Yates draws
_COL_GRAY, _COL_BLUR, _COL_SIGMA = 10, 11, 12
_COLUMNS = 13
SLOTS_PER_VIEW = 16                      # room for a few more draws without moving other views
MAX_VIEWS = (1 << rng.SLOT_BITS) // SLOTS_PER_VIEW


@dataclass(frozen=True)
class AugParams:
    """The per-sample draws of one batch (all tensors on one device, first dim N)."""
    flip: torch.Tensor          # bool [N]
    jitter_on: torch.Tensor     # bool [N]
    brightness: torch.Tensor    # float32 [N], factor
    contrast: torch.Tensor      # float32 [N], factor
    saturation: torch.Tensor    # float32 [N], factor
    hue: torch.Tensor           # float32 [N], shift in turns, within [-0.5, 0.5]
    order: torch.Tensor         # int64 [N, 4], a permutation of the op ids per sample
    gray: torch.Tensor          # bool [N]
    blur_on: torch.Tensor       # bool [N]
    sigma: torch.Tensor         # float32 [N], blur sigma in pixels

    def __len__(self) -> int:
        return self.flip.shape[0]

    @property
    def device(self) -> torch.device:
        return self.flip.device

    def to(self, device, non_blocking: bool = False) -> AugParams:
        return AugParams(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                            for f in fields(self)})

    def __getitem__(self, rows) -> AugParams:
        """The draws of a subset of rows (a slice or an index tensor)."""
        return AugParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@numba.njit(inline="always")
def _coin(seed, step, sample, slot, p):
    """1.0 with probability p, else 0.0."""
    return 1.0 if rng.uniform_cpu(seed, step, sample, slot) < p else 0.0


@cached_njit()
def _draw(seed, step, first, slot0, flip_p, jitter_p, gray_p, blur_p, lo, hi, out):
    """Fill out [N, _COLUMNS]; lo/hi: ranges of brightness, contrast, saturation, hue, sigma."""
    for row in range(out.shape[0]):
        s = first + row
        out[row, _COL_FLIP] = _coin(seed, step, s, slot0 + _COL_FLIP, flip_p)
        out[row, _COL_JITTER] = _coin(seed, step, s, slot0 + _COL_JITTER, jitter_p)
        for j in range(4):
            u = rng.uniform_cpu(seed, step, s, slot0 + _COL_BRIGHTNESS + j)
            out[row, _COL_BRIGHTNESS + j] = lo[j] + (hi[j] - lo[j]) * u
        perm = np.arange(4)
        for j in range(3, 0, -1):      # Fisher-Yates: uniform over the 24 orders
            r = rng.randint_cpu(seed, step, s, slot0 + _COL_ORDER + j - 1, 0, j)
            perm[j], perm[r] = perm[r], perm[j]
        for j in range(4):
            out[row, _COL_ORDER + j] = perm[j]
        out[row, _COL_GRAY] = _coin(seed, step, s, slot0 + _COL_GRAY, gray_p)
        out[row, _COL_BLUR] = _coin(seed, step, s, slot0 + _COL_BLUR, blur_p)
        u = rng.uniform_cpu(seed, step, s, slot0 + _COL_SIGMA)
        out[row, _COL_SIGMA] = lo[4] + (hi[4] - lo[4]) * u


def _probability(name, p):
    if not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _channels(name, v):
    v = tuple(float(c) for c in v)
    if len(v) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(v)}")
    return v


class MoCoV2Augment:
    """MoCo-v2 aug-plus after the crop: the draws with sample() (counter-based, on the host), the
    pixels with apply() (the back end of the images' device); see the module doc.

    flip_p, jitter_p, gray_p, blur_p: each op's probability per sample (0 turns it off).
    jitter = (brightness, contrast, saturation, hue) strengths as in torchvision's ColorJitter:
    factors ~ U[max(0, 1 - v), 1 + v] for the first three, shift ~ U[-hue, hue] turns.
    blur_sigma: (min, max) of sigma ~ U[min, max] in pixels. mean, std: per channel (R, G, B),
    on the 0..1 scale. dtype: output dtype (float32, bfloat16 or float16); the work is float32
    on every device. Bad settings raise ValueError naming the argument.
    """

    def __init__(self, *, flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                 blur_sigma=(0.1, 2.0), blur_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype=torch.float32):
        self.flip_p = _probability("flip_p", flip_p)
        self.jitter_p = _probability("jitter_p", jitter_p)
        self.gray_p = _probability("gray_p", gray_p)
        self.blur_p = _probability("blur_p", blur_p)
        jitter = tuple(float(v) for v in jitter)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError("jitter must be 4 non-negative strengths (brightness, contrast, "
                             f"saturation, hue) with hue <= 0.5, got {jitter}")
        self.jitter = jitter
        lo_sigma, hi_sigma = (float(s) for s in blur_sigma)
        if not 0 < lo_sigma <= hi_sigma:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma}")
        self.blur_sigma = (lo_sigma, hi_sigma)
        self.mean = _channels("mean", mean)
        self.std = _channels("std", std)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if dtype not in OUT_DTYPES:
            raise ValueError(f"dtype must be one of {OUT_DTYPES}, got {dtype}")
        self.dtype = dtype
        b, c, s, h = jitter
        self._lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h, lo_sigma])
        self._hi = np.array([1 + b, 1 + c, 1 + s, h, hi_sigma])
        self._constants = {}
        self._luma = np.array(LUMA, np.float32)

    def __repr__(self):
        return (f"MoCoV2Augment(flip_p={self.flip_p}, jitter={self.jitter}, "
                f"jitter_p={self.jitter_p}, gray_p={self.gray_p}, blur_sigma={self.blur_sigma}, "
                f"blur_p={self.blur_p}, mean={self.mean}, std={self.std}, dtype={self.dtype})")

    def sample(self, n: int, *, seed: int, step: int, view: int = 0, first: int = 0,
               device=None) -> AugParams:
        """Draws for rows 0..n-1 (sample counters first..first+n-1) of view `view` at `step`."""
        n = rng.check_counter("n", n)
        seed, step = rng.check_counter("seed", seed), rng.check_counter("step", step)
        first = rng.check_counter("first", first)
        view = rng.check_counter("view", view)
        if view >= MAX_VIEWS:
            raise ValueError(f"view must be < {MAX_VIEWS}, got {view}")
        packed = np.empty((n, _COLUMNS), np.float32)
        _draw(seed, step, first, rng.slot(rng.STREAM_AUGMENT, view * SLOTS_PER_VIEW),
              self.flip_p, self.jitter_p, self.gray_p, self.blur_p, self._lo, self._hi, packed)
        t = torch.from_numpy(packed)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":
            # one asynchronous copy of the packed draws from pinned memory, split on the device
            t = t.pin_memory().to(device, non_blocking=True)
        return AugParams(
            flip=t[:, _COL_FLIP] > 0.5, jitter_on=t[:, _COL_JITTER] > 0.5,
            brightness=t[:, _COL_BRIGHTNESS], contrast=t[:, _COL_CONTRAST],
            saturation=t[:, _COL_SATURATION], hue=t[:, _COL_HUE],
            order=t[:, _COL_ORDER:_COL_ORDER + 4].long(),
            gray=t[:, _COL_GRAY] > 0.5, blur_on=t[:, _COL_BLUR] > 0.5, sigma=t[:, _COL_SIGMA])

    def __call__(self, x: torch.Tensor, *, seed: int, step: int, view: int = 0,
                 first: int = 0) -> torch.Tensor:
        n, _, _ = _check_images(x)
        return self.apply(x, self.sample(n, seed=seed, step=step, view=view, first=first,
                                         device=x.device))

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """uint8 [N, H, W, 3] (any device) -> normalized [N, 3, H, W], channels_last, self.dtype.

        The back end follows x's device (module doc): CPU -> the fused CPU kernel (the first
        call in a process loads or compiles it), CUDA -> the fused CUDA kernel (torch ops for
        images wider than its MAX_WIDTH), others -> torch ops. params are moved to x's device
        if they are elsewhere. No back end reads a tensor's values on the host: on CUDA they
        queue work without syncing.
        """
        if x.device.type == "cuda":
            return self._apply_fused_cuda(x, self._checked(x, params))
        if x.device.type != "cpu":
            return self._apply_torch(x, params)
        return self._apply_fused_cpu(x, self._checked(x, params))

    def _checked(self, x, params) -> AugParams:
        n, _, _ = _check_images(x)
        if len(params) != n:
            raise ValueError(f"params hold {len(params)} samples, the batch has {n}")
        if params.device != x.device:
            params = params.to(x.device, non_blocking=True)
        return params

    def _packed_draws(self, p, h, w):
        """The fused kernels' inputs (CPU and CUDA alike): per-sample op flags (flip, jitter,
        grey, blur), jitter factors, and the blur's row and column taps."""
        # the torch path skips an op whose probability is 0 whatever the draws say: so do these
        flags = torch.stack([p.flip & (self.flip_p > 0), p.jitter_on & (self.jitter_p > 0),
                             p.gray & (self.gray_p > 0), p.blur_on & (self.blur_p > 0)], 1)
        hue = p.hue if self.jitter[3] > 0 else torch.zeros_like(p.hue)
        factors = torch.stack([p.brightness, p.contrast, p.saturation, hue], 1).float()
        kernel_x = _gaussian_kernels(p.sigma.float(), blur_kernel_size(w))
        kernel_y = _gaussian_kernels(p.sigma.float(), blur_kernel_size(h))
        return flags, factors, kernel_x, kernel_y

    def _apply_fused_cpu(self, x, p):
        """apply() on CPU tensors: the packed draws, one call of the fused CPU kernel."""
        from fastneg.augment import cpu    # loaded on the first CPU batch
        n, h, w, _ = x.shape
        flags, factors, kernel_x, kernel_y = self._packed_draws(p, h, w)
        scale, shift = (t.view(3).numpy() for t in self._normalization(x.device))
        out = cpu.fused_aug_plus_cpu(
            x.contiguous().numpy(), flags.to(torch.uint8).numpy(), factors.numpy(),
            p.order.to(torch.int64).contiguous().numpy(), kernel_x.numpy(), kernel_y.numpy(),
            self._luma, scale, shift)
        out = torch.from_numpy(out).permute(0, 3, 1, 2)      # NCHW view, channels_last memory
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _apply_fused_cuda(self, x, p):
        """apply() on CUDA tensors: the packed draws, one launch of the fused CUDA kernel (torch
        ops beyond its MAX_WIDTH), then the cast to self.dtype."""
        from fastneg.augment import cuda    # lazily: numba.cuda is only needed for CUDA tensors
        n, h, w, _ = x.shape
        if w > cuda.MAX_WIDTH:
            return self._apply_torch(x, p)
        flags, factors, kernel_x, kernel_y = self._packed_draws(p, h, w)
        scale, shift = (t.view(3) for t in self._normalization(x.device))
        luma = self._constants.get((x.device, "luma"))
        if luma is None:
            luma = self._constants[(x.device, "luma")] = to_device(LUMA, x.device)
        out = cuda.fused_aug_plus_cuda(
            x, flags.to(torch.uint8), factors.contiguous(), p.order.to(torch.int64).contiguous(),
            kernel_x, kernel_y, luma, scale, shift)
        out = out.permute(0, 3, 1, 2)                  # NCHW view, channels_last memory
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _apply_torch(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """apply() as batched torch ops on any device (fastneg.augment.torch_ops): the path of
        devices other than CPU and CUDA, and the reference the fused kernels are tested against."""
        return torch_ops.apply_torch(self, x, self._checked(x, params))

    def _normalization(self, device):
        """(scale, shift) [1, 3, 1, 1] on `device`, copied there once (a copy per call would
        make a CUDA stream wait for the host)."""
        if device not in self._constants:
            scale = [1 / (255 * s) for s in self.std]
            shift = [-m / s for m, s in zip(self.mean, self.std)]
            self._constants[device] = tuple(to_device(v, device).view(1, 3, 1, 1)
                                            for v in (scale, shift))
        return self._constants[device]



def to_device(values, device) -> torch.Tensor:
    """float32 tensor of `values` on `device`. To a GPU it goes from pinned memory with a
    non-blocking copy: torch.tensor(values, device="cuda") copies from pageable memory, which
    makes the host wait for the stream (a sync that set_sync_debug_mode("error") refuses)."""
    t = torch.tensor(values, dtype=torch.float32)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_images(x) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of uint8 images, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"expected images [N, H, W, 3] (NHWC), got shape {tuple(x.shape)}")
    if x.shape[3] != 3:
        hint = (" (looks like NCHW: pass NHWC, e.g. x.permute(0, 2, 3, 1))"
                if x.shape[1] == 3 else "")
        raise ValueError(f"expected 3 channels last, [N, H, W, 3], got shape "
                         f"{tuple(x.shape)}{hint}")
    n, h, w, _ = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2 x 2 pixels, got {h} x {w}")
    return n, h, w


