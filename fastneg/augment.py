"""MoCo-v2 "aug-plus" photometric augmentation on whole batches, on any device.

Loaders hand over geometric crops (uint8 [N, H, W, 3]); this module does everything else that
aug-plus does to the pixels, per sample and for the whole batch at once:

    horizontal flip (p 0.5)
    ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p 0.8, the four ops
        in a random order per sample (torchvision's torch.randperm(4) rule)
    grayscale (p 0.2, torchvision's luma weights)
    Gaussian blur (p 0.5, sigma ~ U[0.1, 2.0], odd kernel ~10% of the side, separable, reflect)
    normalize (ImageNet mean/std) -> [N, 3, H, W], channels_last memory

Three implementations of the same formulas: on CPU tensors one fused Numba kernel
(fastneg.augment_cpu, every op of a sample in at most three passes over its pixels); on CUDA
tensors its GPU twin (fastneg.augment_cuda, one Numba CUDA launch per batch); on other devices
batched torch ops (below), which are also the reference both kernels are tested against.

    aug = MoCoV2Augment()
    params = aug.sample(n, seed=seed, step=step, view=0, device=x.device)   # the draws, as tensors
    q = aug.apply(x, params)        # [N, 3, H, W]; the query's texture NS: aug.apply(tex, params)

Draws: every random number comes from fastneg.kernels.rng, u32 = mix(seed, step, sample, slot)
with sample = `first + row` and slot = slot(STREAM_AUGMENT, view * SLOTS_PER_VIEW + k); k is one
of the _COL_* constants below. Give each view of a pair its own `view` and each DDP rank its own
`first` (e.g. rank * n), so that no two images ever share draws unless asked to.

Numerics: each op follows torchvision.transforms.v2's float formulas (values clamped to the
valid range after every jitter op, as torchvision does), computed in float32 without the
uint8 rounding that torchvision applies between ops on uint8 images; the difference is below
one grey level per op. Pixels stay on the 0..255 scale throughout (every op is scale-invariant
apart from its clamp bound), so the uint8->float step is a bare copy and 1/255 folds into the
normalization. In the torch path, samples without jitter still pass the batch's hue pass with a
zero shift, which is the identity up to float rounding (~1e-6 of the range); the kernels skip
ops at their identity. In the torch path on CUDA the blur is a cuDNN convolution and follows
torch.backends.cudnn.allow_tf32 (on by default in PyTorch: TF32 rounds to ~5e-4 relative, a
tenth of a grey level).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numba
import numpy as np
import torch
import torch.nn.functional as F

from fastneg.kernels import rng
from fastneg.kernels.augment_ops import (CONTRAST, HUE, IMAGENET_MEAN, IMAGENET_STD, LUMA,
                                         SATURATION)
from fastneg.kernels.jit import cached_njit
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLUR_KERNEL_FRACTION = 0.1               # kernel ~10% of the side (SimCLR / MoCo-v2: 23 at 224)

# Slot k of each draw within one view; column k of the packed array that sample() fills.
_COL_FLIP, _COL_JITTER, _COL_BRIGHTNESS, _COL_CONTRAST, _COL_SATURATION, _COL_HUE = range(6)
_COL_ORDER = 6                           # 4 columns (a permutation), from 3 Fisher-Yates draws
_COL_GRAY, _COL_BLUR, _COL_SIGMA = 10, 11, 12
_COLUMNS = 13
SLOTS_PER_VIEW = 16                      # room for a few more draws without moving other views
MAX_VIEWS = (1 << rng.SLOT_BITS) // SLOTS_PER_VIEW

# The torch path on CPU works on chunks of about this many bytes of float32 pixels: a 256-image
# batch is far larger than the caches, and every eager op would stream it from RAM (~10x slower).
CPU_CHUNK_BYTES = 4 << 20


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
    """MoCo-v2 aug-plus after the crop: draws with sample(), pixels with apply() (see module doc).

    jitter = (brightness, contrast, saturation, hue) strengths as in torchvision's ColorJitter:
    factors ~ U[max(0, 1 - v), 1 + v] for the first three, shift ~ U[-hue, hue].
    dtype: output dtype (float32, bfloat16 or float16); the work is float32 on every device.
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

        CPU tensors go through one fused Numba kernel (fastneg.augment_cpu; the first call in a
        process loads or compiles it), CUDA tensors through its GPU twin (fastneg.augment_cuda,
        one launch per batch on torch's current stream; images wider than its MAX_WIDTH take
        the torch path); other devices through batched torch ops (_apply_torch, the reference).
        None of them reads a tensor's values on the host: on CUDA they queue work without syncing.
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
        """apply() on CPU tensors: pack the draws, one call of fastneg.augment_cpu's kernel."""
        from fastneg import augment_cpu    # loaded on the first CPU batch
        from fastneg.host import keep_freed_memory_once
        keep_freed_memory_once()    # the outputs below reuse freed pages, call after call
        n, h, w, _ = x.shape
        flags, factors, kernel_x, kernel_y = self._packed_draws(p, h, w)
        scale, shift = (t.view(3).numpy() for t in self._normalization(x.device))
        # numpy asks the kernel for transparent huge pages on large arrays, torch.empty does not:
        # first-touch page faults on the fresh output cost ~2x less (measured, 224 px batches)
        out = np.empty((n, h, w, 3), np.float32)
        scratch = np.empty((numba.get_num_threads(), h, 3, w), np.float32)   # one image/thread
        augment_cpu.fused_aug_plus(
            x.contiguous().numpy(), flags.to(torch.uint8).numpy(), factors.numpy(),
            p.order.to(torch.int64).contiguous().numpy(), kernel_x.numpy(), kernel_y.numpy(),
            self._luma, scale, shift, scratch, out)
        out = torch.from_numpy(out).permute(0, 3, 1, 2)      # NCHW view, channels_last memory
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _apply_fused_cuda(self, x, p):
        """apply() on CUDA tensors: the CPU kernel's packed draws, one fastneg.augment_cuda
        launch, then the cast to self.dtype."""
        from fastneg import augment_cuda    # lazily: numba.cuda is only needed for CUDA tensors
        n, h, w, _ = x.shape
        if w > augment_cuda.MAX_WIDTH:
            return self._apply_torch(x, p)
        flags, factors, kernel_x, kernel_y = self._packed_draws(p, h, w)
        scale, shift = (t.view(3) for t in self._normalization(x.device))
        luma = self._constants.get((x.device, "luma"))
        if luma is None:
            luma = self._constants[(x.device, "luma")] = to_device(LUMA, x.device)
        out = augment_cuda.fused_aug_plus_cuda(
            x, flags.to(torch.uint8), factors.contiguous(), p.order.to(torch.int64).contiguous(),
            kernel_x, kernel_y, luma, scale, shift)
        out = out.permute(0, 3, 1, 2)                  # NCHW view, channels_last memory
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _apply_torch(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """apply() as batched torch ops on any device: the CUDA path, and the reference the
        fused CPU kernel is tested against."""
        params = self._checked(x, params)
        n, h, w, _ = x.shape
        out = torch.empty((n, 3, h, w), dtype=self.dtype, device=x.device,
                          memory_format=torch.channels_last)
        chunk = max(1, n if x.device.type != "cpu" else CPU_CHUNK_BYTES // (12 * h * w))
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            self._apply_chunk(x[rows], params[rows], out[rows])
        return out

    def _apply_chunk(self, x, p, out):
        n, h, w, _ = x.shape
        img = torch.empty((n, 3, h, w), dtype=torch.float32, device=x.device)
        img.copy_(x.permute(0, 3, 1, 2))          # planar float on the 0..255 scale
        # Every later op commutes with a horizontal flip (pixel-wise, image means, symmetric
        # blur with symmetric padding), so flip here; planar rows make it a cheap reversal.
        if self.flip_p > 0:
            img = torch.where(p.flip.view(n, 1, 1, 1), img.flip(3), img)
        if self.jitter_p > 0:
            img = self._jitter(img, p)
        if self.gray_p > 0:
            one = torch.ones_like(p.sigma)
            img = _blend(img, torch.where(p.gray, 0.0, one), gray_w=one, mean_w=one * 0)
        if self.blur_p > 0:
            img = _gaussian_blur(img, p.sigma, p.blur_on, rows_only=x.device.type == "cpu")
        scale, shift = self._normalization(x.device)
        # (x/255 - mean)/std, written straight into the channels_last output of the final dtype
        torch.addcmul(shift, img, scale, out=out)

    def _normalization(self, device):
        """(scale, shift) [1, 3, 1, 1] on `device`, copied there once (a copy per call would
        make a CUDA stream wait for the host)."""
        if device not in self._constants:
            scale = [1 / (255 * s) for s in self.std]
            shift = [-m / s for m, s in zip(self.mean, self.std)]
            self._constants[device] = tuple(to_device(v, device).view(1, 3, 1, 1)
                                            for v in (scale, shift))
        return self._constants[device]

    def _jitter(self, img, p):
        """ColorJitter with a per-sample order, without a loop over samples.

        Brightness, contrast and saturation are all blends f * x + (1 - f) * ref (ref = 0, the
        grey mean, the grey image), so one blend pass can apply a different op to each sample.
        Hue (an HSV round trip, ~6x the cost of a blend) runs once for the whole batch; each
        sample applies the ops that precede its hue in three blend passes before it and the
        ops that follow in three after it: 6 blends + 1 hue instead of 4 x (blend + hue).
        """
        n = img.shape[0]
        one = torch.ones_like(p.brightness)
        factor_of_op = torch.stack([p.brightness, p.contrast, p.saturation, one], 1)
        factor = factor_of_op.gather(1, p.order)                     # [N, 4], by position
        gray_w = (p.order == SATURATION).float()
        mean_w = (p.order == CONTRAST).float()
        hue_at = (p.order == HUE).long().argmax(1, keepdim=True)     # [N, 1]
        position = torch.arange(4, device=img.device).view(1, 4)
        before = p.jitter_on.view(n, 1) & (position < hue_at)
        after = p.jitter_on.view(n, 1) & (position > hue_at)
        for j in range(3):
            img = _blend(img, torch.where(before[:, j], factor[:, j], one),
                         gray_w[:, j], mean_w[:, j])
        if self.jitter[3] > 0:
            img = _adjust_hue(img, torch.where(p.jitter_on, p.hue, 0.0))
        for j in range(1, 4):
            img = _blend(img, torch.where(after[:, j], factor[:, j], one),
                         gray_w[:, j], mean_w[:, j])
        return img


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


def _blend(img, factor, gray_w, mean_w, bound=255.0):
    """clamp(f * img + (1 - f) * ref) with ref = gray_w * grey + mean_w * mean(grey), per sample.

    f = brightness factor with weights (0, 0); contrast (0, 1); saturation (1, 0); f = 1 is
    the identity (exactly: 1 * x + 0 * ref == x), f = 0 with (1, 0) is grayscale.
    """
    n = img.shape[0]
    r, g, b = img.unbind(1)
    grey = r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)
    mean = grey.mean((2, 3), keepdim=True)
    ref = torch.addcmul(mean * mean_w.view(n, 1, 1, 1), grey, gray_w.view(n, 1, 1, 1))
    return torch.lerp(ref.expand_as(img), img, factor.view(n, 1, 1, 1)).clamp_(0.0, bound)


def _adjust_hue(img, shift):
    """Rotate the HSV hue of each sample by `shift` turns (torchvision's adjust_hue).

    H, S, V round trip without the S and V channels: V = max and V * S = max - min survive the
    rotation, and each output channel is max - chroma * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B (the standard closed form of HSV -> RGB).
    """
    n = img.shape[0]
    r, g, b = img.unbind(1)
    mx = torch.maximum(r, g)                     # elementwise: ~20x faster than aminmax(dim=1)
    mx = torch.maximum(mx, b, out=mx)
    mn = torch.minimum(r, g)
    mn = torch.minimum(mn, b, out=mn)
    chroma = mx - mn
    denom = torch.where(chroma > 0, chroma, 1.0)     # grey pixels: any hue gives max
    # hue * 6 in [-1, 5), torchvision's sector rule (red first, then green, then blue)
    h6 = torch.where(mx == r, g - b, torch.where(mx == g, b - r + 2 * denom, r - g + 4 * denom))
    h6 = h6.div_(denom).add_(6 * shift.view(n, 1, 1))
    out = torch.empty_like(img)
    for c, offset in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + offset, 6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.addcmul(mx, chroma, ramp, value=-1.0, out=out[:, c])
    return out


def blur_kernel_size(side: int) -> int:
    """Odd kernel length for an image side: ~10% of it, at least 3 (its reflect padding,
    size // 2, then stays below the side for any side >= 2)."""
    return max(3, int(side * BLUR_KERNEL_FRACTION) | 1)


def _gaussian_kernels(sigma, size):
    """[N, size] normalized 1-D Gaussians (torchvision's gaussian_blur kernel)."""
    x = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
    return torch.softmax(-0.5 * (x.view(1, -1) / sigma.view(-1, 1)) ** 2, dim=1)


def _gaussian_blur(img, sigma, on, *, rows_only):
    """Separable Gaussian blur with a per-sample sigma where `on`, reflect padding.

    rows_only: blur just the chosen rows (needs their indices on the host: fine on CPU, where
    it halves the work); otherwise blur every row, with an identity kernel where off (no sync).
    """
    if rows_only:
        rows = on.nonzero().squeeze(1)
        if rows.numel():
            img[rows] = _separable_blur(img[rows], sigma[rows], None)
        return img
    return _separable_blur(img, sigma, on)


def _separable_blur(img, sigma, on):
    """Grouped (depthwise) convolution: one group per (sample, channel), rows then columns."""
    n, c, h, w = img.shape
    planes = img.reshape(1, n * c, h, w)
    for axis, side in ((3, w), (2, h)):
        size = blur_kernel_size(side)
        kernels = _gaussian_kernels(sigma, size)
        if on is not None:
            identity = (torch.arange(size, device=img.device) == size // 2).float()
            kernels = torch.where(on.view(n, 1), kernels, identity)
        kernels = kernels.repeat_interleave(c, 0)
        r = size // 2
        if axis == 3:
            planes = F.conv2d(F.pad(planes, (r, r, 0, 0), mode="reflect"),
                              kernels.view(n * c, 1, 1, size), groups=n * c)
        else:
            planes = F.conv2d(F.pad(planes, (0, 0, r, r), mode="reflect"),
                              kernels.view(n * c, 1, size, 1), groups=n * c)
    return planes.view(n, c, h, w)
