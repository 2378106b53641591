"""Image quilting (fastneg.texture.synthesis): shape, copies, seams, colour statistics, determinism."""
import numpy as np
import pytest

from fastneg.data.synthetic import textured
from fastneg.kernels import rng
from fastneg.texture import quilt, synthesize
from fastneg.texture import synthesis

BLOCK, OVERLAP = 12, 2


def exemplar_pair(family: str, seed: int = 0):
    """Two overlapping 40x40 crops of one 64x64 procedural texture."""
    img = textured(family, np.random.default_rng(seed), (64, 64))
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return [img[:40, :40], img[24:, 24:]]


def gradient_energy(x: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels: seams and discontinuities raise it."""
    x = x.astype(np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def random_blocks(exemplars, size, seed, sample):
    """Efros-Freeman's baseline: random windows on the same grid, pasted without any cut."""
    step = BLOCK - OVERLAP
    n = -(-(size - OVERLAP) // step)
    canvas = np.zeros((n * step + OVERLAP,) * 2 + (3,), np.uint8)
    for b in range(n * n):
        r, c = divmod(b, n)
        draw = [rng.randint(seed, 0, sample, rng.slot(rng.STREAM_TEXSYN, 3 * b + j), lo, hi)
                for j, (lo, hi) in enumerate([(0, len(exemplars) - 1), (0, 40 - BLOCK),
                                              (0, 40 - BLOCK)])]
        k, y, x = draw
        canvas[r * step:r * step + BLOCK, c * step:c * step + BLOCK] = \
            exemplars[k][y:y + BLOCK, x:x + BLOCK]
    return canvas[:size, :size]


def test_shape_dtype_and_sizes():
    ex = exemplar_pair("dots")
    out = quilt(ex, (50, 70), block=BLOCK, overlap=OVERLAP, seed=1)
    assert out.shape == (50, 70, 3) and out.dtype == np.uint8
    # Exemplars of different sizes, and a single exemplar, are accepted.
    assert quilt([ex[0], ex[1][:30, :25]], 33, block=BLOCK, overlap=OVERLAP).shape == (33, 33, 3)
    assert quilt(ex[0], 20, block=BLOCK, overlap=OVERLAP).shape == (20, 20, 3)


def test_blocks_are_exemplar_copies_except_on_seams():
    ex = exemplar_pair("bricks")
    size = 64
    out, placements = quilt(ex, size, block=BLOCK, overlap=OVERLAP, seed=3, sample=7,
                            return_placements=True)
    step = BLOCK - OVERLAP
    from_some_block = np.zeros((size, size), bool)
    for r in range(placements.shape[0]):
        for c in range(placements.shape[1]):
            k, y, x = placements[r, c]
            window = ex[k][y:y + BLOCK, x:x + BLOCK]
            py, px = r * step, c * step
            h, w = min(BLOCK, size - py), min(BLOCK, size - px)
            if h <= 0 or w <= 0:
                continue
            region = out[py:py + h, px:px + w]
            from_some_block[py:py + h, px:px + w] |= (region == window[:h, :w]).all(-1)
            # Away from every overlap the block is a verbatim copy.
            core = region[OVERLAP:BLOCK - OVERLAP, OVERLAP:BLOCK - OVERLAP]
            np.testing.assert_array_equal(core, window[OVERLAP:OVERLAP + core.shape[0],
                                                       OVERLAP:OVERLAP + core.shape[1]])
    # In the overlaps every pixel still comes from one of the blocks covering it (the cut).
    assert from_some_block.all()


@pytest.mark.parametrize("family", ["stripes", "zigzag", "checkers"])
def test_quilting_seams_beat_random_blocks(family):
    ex = exemplar_pair(family, seed=2)
    quilted = [gradient_energy(quilt(ex, 64, block=BLOCK, overlap=OVERLAP, seed=5, sample=s))
               for s in range(3)]
    naive = [gradient_energy(random_blocks(ex, 64, seed=5, sample=s)) for s in range(3)]
    reference = np.mean([gradient_energy(e) for e in ex])
    assert np.mean(quilted) < np.mean(naive)
    # Quilting stays near the exemplars' own structure; random blocks add seam energy.
    assert abs(np.mean(quilted) - reference) < abs(np.mean(naive) - reference)


@pytest.mark.parametrize("family", ["stripes", "dots", "noise", "waves"])
def test_colour_statistics_match_exemplars(family):
    ex = exemplar_pair(family, seed=4)
    out = quilt(ex, 72, block=BLOCK, overlap=OVERLAP, seed=0, sample=1).reshape(-1, 3)
    pixels = np.concatenate([e.reshape(-1, 3) for e in ex]).astype(np.float64)
    # Noise comes in blocks of a few pixels: fewer independent samples, a wider tolerance.
    atol = 12 if family == "noise" else 8
    np.testing.assert_allclose(out.mean(0), pixels.mean(0), atol=atol)
    np.testing.assert_allclose(out.std(0), pixels.std(0), atol=atol)


def test_deterministic_and_sample_dependent():
    ex = exemplar_pair("waves")
    a = quilt(ex, 48, block=BLOCK, overlap=OVERLAP, seed=9, sample=4)
    quilt(ex, 48, block=BLOCK, overlap=OVERLAP, seed=9, sample=5)       # no hidden state
    np.testing.assert_array_equal(a, quilt(ex, 48, block=BLOCK, overlap=OVERLAP, seed=9,
                                           sample=4))
    assert not np.array_equal(a, quilt(ex, 48, block=BLOCK, overlap=OVERLAP, seed=9, sample=6))
    assert not np.array_equal(a, quilt(ex, 48, block=BLOCK, overlap=OVERLAP, seed=8, sample=4))


def test_overlap_errors_are_exact_ssd():
    """The FFT shortcut gives the same integer SSD as a direct sum, for all three overlap shapes."""
    g = np.random.default_rng(0)
    ex = g.integers(0, 256, (2, 20, 23, 3), dtype=np.uint8)
    sizes = np.array([[20, 23], [17, 21]], np.int64)
    canvas = g.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    block, ov, py, px = 8, 3, 5, 9
    energy = np.zeros((2, 21, 24), np.int64)
    synthesis._energy_integral(ex, energy)
    fe = np.fft.rfft2(ex.transpose(0, 3, 1, 2).astype(np.float64))
    for has_left, has_top in [(True, False), (False, True), (True, True)]:
        tmpl = np.empty((3, block, block))
        t2 = synthesis._fill_template(canvas, py, px, block, ov, has_left, has_top, tmpl)
        ft = np.fft.fft(np.fft.rfft(tmpl, n=23, axis=2), n=20, axis=1)
        spec = np.empty((2, 20, 12), np.complex128)
        synthesis._cross_spectrum(fe, ft, spec)
        errors = np.empty((2, 13, 16), np.int64)
        best = synthesis._overlap_errors(sizes, energy, np.fft.irfft2(spec, s=(20, 23)), t2,
                                         block, ov, has_left, has_top, errors)
        ii, jj = np.mgrid[:block, :block]
        mask = ((jj < ov) & has_left) | ((ii < ov) & has_top)
        old = canvas[py:py + block, px:px + block].astype(np.int64)
        direct = np.full((2, 13, 16), synthesis._NO_CANDIDATE, np.int64)
        for k in range(2):
            for y in range(sizes[k, 0] - block + 1):
                for x in range(sizes[k, 1] - block + 1):
                    d = ex[k, y:y + block, x:x + block].astype(np.int64) - old
                    direct[k, y, x] = (d ** 2).sum(-1)[mask].sum()
        np.testing.assert_array_equal(errors, direct)
        assert best == direct.min()


def test_synthesize_paper_recipe_and_tiny_images():
    g = np.random.default_rng(1)
    big = g.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = synthesize(big, 40, exemplar=24, seed=2, sample=11)
    assert out.shape == (40, 40, 3)
    # The exemplars are the central crop and a random crop: pixels all come from the image.
    colours = set(map(tuple, big.reshape(-1, 3)))
    assert all(tuple(p) in colours for p in out.reshape(-1, 3)[::7])
    # Tiny-image rule: upscaled so the shorter side equals the exemplar, aspect kept.
    tiny = g.integers(0, 256, (10, 15, 3), dtype=np.uint8)
    assert synthesis.fit_source(tiny, 24).shape == (24, 36, 3)
    assert synthesize(tiny, 40, exemplar=24, seed=2, sample=0).shape == (40, 40, 3)


def test_bad_input_is_named():
    ex = exemplar_pair("dots")
    with pytest.raises(ValueError, match="smaller than the block"):
        quilt([ex[0][:10, :10]], 32, block=BLOCK, overlap=OVERLAP)
    with pytest.raises(ValueError, match="uint8"):
        quilt([ex[0].astype(np.float32)], 32, block=BLOCK, overlap=OVERLAP)
    with pytest.raises(ValueError, match="overlap"):
        quilt(ex, 32, block=BLOCK, overlap=BLOCK)
