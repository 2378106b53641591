"""The torch back end of fastneg.augment: aug-plus as batched torch ops, on any device.

The reference both fused kernels (fastneg.augment.cpu, fastneg.augment.cuda) are tested
against, and the path MoCoV2Augment.apply takes on devices other than CPU and CUDA, and on CUDA
for images wider than fastneg.augment.cuda.MAX_WIDTH. Each op is one eager pass over the batch
(on CPU over chunks of CPU_CHUNK_BYTES, which stay in the caches). Formulas: torchvision's float
formulas on the 0..255 scale, a clamp after every jitter op. Samples without jitter still pass
the batch's hue pass with a zero shift, the identity up to float rounding (~1e-6 of the range).
On CUDA the blur is a cuDNN convolution and follows torch.backends.cudnn.allow_tf32 (on by
default in PyTorch: TF32 rounds to ~5e-4 relative, a tenth of a grey level).

Also here: the blur's kernel size and taps, which the fused kernels take precomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastneg.kernels.augment_ops import CONTRAST, HUE, LUMA, SATURATION

BLUR_KERNEL_FRACTION = 0.1               # kernel ~10% of the side (SimCLR / MoCo-v2: 23 at 224)

# On CPU the torch path works on chunks of about this many bytes of float32 pixels: a 256-image
# batch is far larger than the caches, and every eager op would stream it from RAM (~10x slower).
CPU_CHUNK_BYTES = 4 << 20


def apply_torch(aug, x: torch.Tensor, p) -> torch.Tensor:
    """aug.apply(x, p) as batched torch ops: uint8 [N, H, W, 3] -> [N, 3, H, W] channels_last of
    aug.dtype. aug: the MoCoV2Augment whose settings apply; p: its AugParams for x, on x's
    device (MoCoV2Augment._apply_torch checks both)."""
    n, h, w, _ = x.shape
    out = torch.empty((n, 3, h, w), dtype=aug.dtype, device=x.device,
                      memory_format=torch.channels_last)
    chunk = max(1, n if x.device.type != "cpu" else CPU_CHUNK_BYTES // (12 * h * w))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        _apply_chunk(aug, x[rows], p[rows], out[rows])
    return out

def _apply_chunk(aug, x, p, out):
    n, h, w, _ = x.shape
    img = torch.empty((n, 3, h, w), dtype=torch.float32, device=x.device)
    img.copy_(x.permute(0, 3, 1, 2))          # planar float on the 0..255 scale
    # Every later op commutes with a horizontal flip (pixel-wise, image means, symmetric
    # blur with symmetric padding), so flip here; planar rows make it a cheap reversal.
    if aug.flip_p > 0:
        img = torch.where(p.flip.view(n, 1, 1, 1), img.flip(3), img)
    if aug.jitter_p > 0:
        img = _jitter(aug, img, p)
    if aug.gray_p > 0:
        one = torch.ones_like(p.sigma)
        img = _blend(img, torch.where(p.gray, 0.0, one), gray_w=one, mean_w=one * 0)
    if aug.blur_p > 0:
        img = _gaussian_blur(img, p.sigma, p.blur_on, rows_only=x.device.type == "cpu")
    scale, shift = aug._normalization(x.device)
    # (x/255 - mean)/std, written straight into the channels_last output of the final dtype
    torch.addcmul(shift, img, scale, out=out)


def _jitter(aug, img, p):
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
    if aug.jitter[3] > 0:
        img = _adjust_hue(img, torch.where(p.jitter_on, p.hue, 0.0))
    for j in range(1, 4):
        img = _blend(img, torch.where(after[:, j], factor[:, j], one),
                     gray_w[:, j], mean_w[:, j])
    return img


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
