"""The data half of a training step, for one rank: a loader batch in, the model's inputs out.

    views, negatives = make_views_and_negatives(batch, aug=aug, seed=seed, step=step,
                                                negatives="patch", patch_range=(16, 72))
    loss, _ = model(views[0], views[1], ns=negatives, step=step)

1. draws: aug.sample for every view, per (seed, step, view, sample) with sample counted over
   the global batch (rank r of ranks with n samples each owns samples r * n .. r * n + n - 1);
2. aug-plus on every view (fastneg.augment);
3. patch NS of the augmented query (fastneg.kernels.patch_negatives);
4. texture NS: the image's own texture, given the query's augmentation draws (its colour, grey,
   blur and flip), from a fastneg.texture.source.TextureSource: the loader's batch.textures (a
   JPEG bank, cropped and flipped by the loader per (seed, epoch, dataset index)), or a random
   resized crop from a bank held whole (fastneg.kernels.sample_textures, per (seed, draw_step,
   row)); which one is the source's business (fastneg.texture.source), not the step's.

The NS kernels count samples by batch row, so they take draw_step = step * world_size + rank
to keep ranks apart. The trainer and the benchmarks call this function, so what the benchmarks
measure is the trainer's step.
"""
from __future__ import annotations

from fastneg.kernels import patch_negatives
from fastneg.texture.source import as_texture_source

NEGATIVES = ("none", "patch", "texture", "both")
PAPER_SIZE, PAPER_PATCH_RANGE = 224, (16, 72)


def scaled_patch_range(size: int) -> tuple[int, int]:
    """The paper's patch sides (16..72 px at 224 px) scaled to `size`, each at least 2."""
    lo, hi = (max(2, round(v * size / PAPER_SIZE)) for v in PAPER_PATCH_RANGE)
    return lo, hi


def make_views_and_negatives(batch, *, aug, seed: int, step: int, rank: int = 0,
                             world_size: int = 1, negatives: str = "patch",
                             patch_range=(16, 72), textures=None):
    """(views, negatives) for one rank's `batch` (a fastneg.loaders.Batch) at training `step`.

    aug: a fastneg.augment.MoCoV2Augment (its dtype is the output dtype).
    negatives: one of NEGATIVES; "texture" and "both" need `textures`: a
    fastneg.texture.source.TextureSource (texture_source(BANK) gives the right one for a bank),
    an object with for_batch(indices) -> (bank, ids) such as fastneg.texture.TextureBank (held
    whole), or None: the batch's own textures (a loader built with texture_bank=).
    Returns views (a list, one normalized [N, 3, H, W] tensor per loader view, the query first)
    and negatives (a list: the patch NS, then the texture NS, as asked).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    source = as_texture_source(textures) if negatives in ("texture", "both") else None
    if source is not None and not source.ready(batch):
        raise ValueError(f"negatives={negatives!r} needs a texture bank (a loader's "
                         "texture_bank= or textures=...)")
    n = batch.views[0].shape[0]
    device = batch.views[0].device
    draws = [aug.sample(n, seed=seed, step=step, view=i, first=rank * n, device=device)
             for i in range(len(batch.views))]
    views = [aug.apply(v, d) for v, d in zip(batch.views, draws)]
    draw_step = step * world_size + rank
    made = []
    if negatives in ("patch", "both"):
        made.append(patch_negatives(views[0], layout="nchw", patch_range=tuple(patch_range),
                                    seed=seed, step=draw_step))
    if source is not None:   # the query's draws: the texture looks like the query
        tex = source.textures(batch, seed=seed, draw_step=draw_step, size=views[0].shape[-1])
        made.append(aug.apply(tex, draws[0]))
    return views, made
