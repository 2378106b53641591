"""Pure-torch references for fastneg.kernels: slow, literal, one sample at a time.

They follow the paper's description rather than the kernels' gather formulation (a canvas of
n*d x n*d built tile by tile, then cropped; a crop tensor resampled with vectorised taps), draw
from the interpreted RNG, and must agree with the kernels bit for bit. patch_negatives here is
also the per-sample Python loop that benchmarks/kernels.py uses as its anchor.
"""
from __future__ import annotations

import torch

from fastneg.kernels import crop, rng
from fastneg.kernels.patch import SLOT_D
from fastneg.kernels.textures import SLOT_BOX, SLOT_FLIP


def _jigsaw(seed, step, sample, count):
    """Fisher-Yates permutation of range(count) with draws at SLOT_D + 1 + j."""
    order = list(range(count))
    for j in range(count - 1, 0, -1):
        r = rng.randint(seed, step, sample, SLOT_D + 1 + j, 0, j)
        order[j], order[r] = order[r], order[j]
    return order


def patch_negatives(x, *, layout, patch_range=(16, 72), seed, step=0, mode="sample"):
    """Reference of fastneg.kernels.patch_negatives (returns a new, contiguous tensor)."""
    lo, hi = patch_range
    images = x if layout == "nhwc" else x.permute(0, 2, 3, 1)   # [N, H, W, C]
    n, h, w, c = images.shape
    out = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device)
    for i in range(n):
        d = rng.randint(seed, step, i, SLOT_D, lo, hi)
        tiles = h // d + 1, w // d + 1
        canvas = torch.zeros((tiles[0] * d, tiles[1] * d, c), dtype=x.dtype, device=x.device)
        if mode == "sample":
            for k in range(tiles[0] * tiles[1]):
                y = rng.randint(seed, step, i, SLOT_D + 1 + 2 * k, 0, h - d - 1)
                x0 = rng.randint(seed, step, i, SLOT_D + 2 + 2 * k, 0, w - d - 1)
                ty, tx = divmod(k, tiles[1])
                canvas[ty * d:(ty + 1) * d, tx * d:(tx + 1) * d] = images[i, y:y + d, x0:x0 + d]
        else:
            # Jigsaw of the full-tile grid; the strips past it keep the input's pixels.
            canvas[:h, :w] = images[i]
            grid = h // d, w // d
            for j, source in enumerate(_jigsaw(seed, step, i, grid[0] * grid[1])):
                (ty, tx), (sy, sx) = divmod(j, grid[1]), divmod(source, grid[1])
                canvas[ty * d:(ty + 1) * d, tx * d:(tx + 1) * d] = \
                    images[i, sy * d:(sy + 1) * d, sx * d:(sx + 1) * d]
        out[i] = canvas[:h, :w]
    return out if layout == "nhwc" else out.permute(0, 3, 1, 2).contiguous()


def texture_params(sample, h, w, *, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed, step=0):
    """(top, left, height, width, flip) of one sample's texture crop, from the interpreted RNG."""
    top, left, ch, cw = crop.rrc_box(seed, step, sample, SLOT_BOX, h, w, scale, ratio)
    return top, left, ch, cw, rng.uniform(seed, step, sample, SLOT_FLIP) < 0.5


def _taps(size, length, device):
    """Bilinear taps (i0, i1, w1), align_corners=False, weights in units of 1 / (2 size)."""
    num = ((2 * torch.arange(size, device=device) + 1) * length - size).clamp(min=0)
    i0 = torch.div(num, 2 * size, rounding_mode="floor")
    return i0, (i0 + 1).clamp(max=length - 1), num - i0 * 2 * size


def resize_bilinear(image, size):
    """uint8 [h, w, 3] -> uint8 [size, size, 3], bilinear in exact integer arithmetic."""
    den = 2 * size
    y0, y1, wy = _taps(size, image.shape[0], image.device)
    x0, x1, wx = _taps(size, image.shape[1], image.device)
    pixels = image.to(torch.int64)
    wx, wy = wx[None, :, None], wy[:, None, None]
    upper = (den - wx) * pixels[y0][:, x0] + wx * pixels[y0][:, x1]
    lower = (den - wx) * pixels[y1][:, x0] + wx * pixels[y1][:, x1]
    total = (den - wy) * upper + wy * lower + den * den // 2
    return torch.div(total, den * den, rounding_mode="floor").to(torch.uint8)


def sample_textures(bank, ids, *, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed, step=0):
    """Reference of fastneg.kernels.sample_textures."""
    out = torch.empty((ids.shape[0], size, size, 3), dtype=torch.uint8, device=bank.device)
    for i, b in enumerate(ids.tolist()):
        top, left, ch, cw, flip = texture_params(i, bank.shape[1], bank.shape[2], scale=scale,
                                                 ratio=ratio, seed=seed, step=step)
        resized = resize_bilinear(bank[b, top:top + ch, left:left + cw], size)
        out[i] = resized.flip(1) if flip else resized
    return out
