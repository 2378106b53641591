"""The embedded default dataset: shapes whose label is the shape and whose texture is a shortcut.

Each image is one of ten shapes filled with one of ten procedural texture families (periods of
about a tenth of the image side, so several pixels at the training size even after a 0.2 area
crop), placed near the centre at a random scale and a moderate rotation over a plain background.
Colours do not identify an image: by default the texture is dark/light grey over one of three
grey background levels (`colour="grey"`); `colour="palette"` draws the texture's two colours
from four pairs shared by every class; `colour="random"` is the old design (random colours per
image, which a contrastive model uses to tell images apart instead of shape or texture).
Class c has a *dominant* texture family (family c). In `train` and `val` an image carries its
class's dominant family with probability p (default 0.8) and another family otherwise, so a model
can score well by reading texture alone. The other splits expose that shortcut:

- `conflict`: every image carries the dominant family of *another* class (cue conflict);
- `outline`: shape outlines only, no texture (sketch-like).

With `independent=True` (`fastneg make-data --independent`, the Trifeature design of Hermann
and Lampinen 2020) train and val draw shape, texture family and, in palette mode, colour
independently and uniformly, so linear read-outs of each factor from frozen features measure
what the features encode (`fastneg eval`'s `readout`).

Every split is an ImageFolder (one folder per class, JPEG files) with a metadata.csv:
file, label, shape, texture, texture_class (the class whose dominant family the texture is),
colour (the palette entry's name; "grey" or "random" in those modes).

Generation is deterministic: image i of split s depends only on (seed, s, i), never on worker
count or order, so the same seed gives the same bytes everywhere.
"""
from __future__ import annotations

import csv
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from fastneg.progress import tqdm

from fastneg.data.files import available_cpus
from fastneg.fs import staged_dir
from fastneg.kernels.rng import STREAM_DATA

SHAPES = ("circle", "square", "triangle", "star", "cross",
          "heart", "hexagon", "ring", "crescent", "arrow")
TEXTURES = ("stripes", "checkers", "dots", "waves", "noise",
            "bricks", "zigzag", "grid", "rings", "blotches")
SPLITS = ("train", "val", "conflict", "outline")
# Images per class of the evaluation splits, as a fraction of the training split's.
EVAL_FRACTION = 0.2
COLOUR_MODES = ("grey", "palette", "random")
GREY_LEVELS = (40.0, 215.0)            # the texture's two levels in grey mode
BACKGROUND_LEVELS = (70.0, 128.0, 185.0)   # plain grey backgrounds, shared by every class
# Texture colour pairs of palette mode, shared by every class: (name, colour 1, colour 2).
PALETTE = (("red", (200, 40, 40), (250, 200, 190)), ("green", (30, 140, 50), (200, 245, 190)),
           ("blue", (40, 60, 190), (190, 210, 250)), ("yellow", (150, 120, 0), (250, 235, 120)))


@dataclass(frozen=True)
class DatasetSpec:
    images_per_class: int = 500
    size: int = 96                 # image side (square) unless imagenet_like
    seed: int = 0
    p_dominant: float = 0.8        # P(texture = the class's dominant family) in train/val
    imagenet_like: bool = False    # ~500x375 JPEG q90, for throughput benchmarks
    quality: int = 90
    colour: str = "grey"           # one of COLOUR_MODES
    independent: bool = False      # train/val: shape, texture (and palette colour) independent

    @property
    def hw(self) -> tuple[int, int]:
        return (375, 500) if self.imagenet_like else (self.size, self.size)

    def count(self, split: str) -> int:
        if split == "train":
            return self.images_per_class
        return max(1, round(self.images_per_class * EVAL_FRACTION))


# ---------------------------------------------------------------- shapes (unit coordinates)

def _circle(n=64, r=1.0, cx=0.0, cy=0.0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(k, r=1.0, phase=-np.pi / 2):
    t = phase + np.arange(k) * 2 * np.pi / k
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star():
    outer, inner = _regular(5), _regular(5, 0.42, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _heart(n=80):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    return (pts - pts.mean(0)) / 17.0


_POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8,
    "triangle": _regular(3, 1.1, -np.pi / 2) + [0, 0.2],
    "star": _star(),
    "cross": np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                       [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]], float),
    "heart": _heart(),
    "hexagon": _regular(6),
    "arrow": np.array([[-1, -.3], [.2, -.3], [.2, -.75], [1, 0], [.2, .75], [.2, .3],
                       [-1, .3]], float),
}
# Shapes with holes: (filled outer polygon, polygon cut out of it).
_HOLED = {
    "circle": (_circle(), None),
    "ring": (_circle(), _circle(r=0.55)),
    "crescent": (_circle(), _circle(r=0.85, cx=0.45, cy=-0.2)),
}


def shape_mask(shape: str, hw, center, radius, angle, supersample=2) -> np.ndarray:
    """float32 [H, W] coverage in [0, 1] of `shape` (antialiased by supersampling)."""
    h, w = hw
    s = supersample
    c, si = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -si], [si, c]])

    def place(pts):
        p = pts @ rot.T * radius + center
        return [tuple(q) for q in (p * s)]

    img = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(img)
    outer, hole = _HOLED.get(shape, (_POLYGONS.get(shape), None))
    draw.polygon(place(outer), fill=255)
    if hole is not None:
        draw.polygon(place(hole), fill=0)
    img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


# ---------------------------------------------------------------- textures

def _value_noise(rng, hw, cells):
    """Smooth noise in [0, 1]: a random grid of `cells` upsampled bilinearly."""
    h, w = hw
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def texture_pattern(family: str, rng: np.random.Generator, hw) -> np.ndarray:
    """float32 [H, W] in [0, 1]: the pattern of one texture family with random parameters."""
    h, w = hw
    scale = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = (xx * np.cos(a) + yy * np.sin(a)) / scale
    v = (-xx * np.sin(a) + yy * np.cos(a)) / scale
    f = rng.uniform(6, 10)                     # periods per image side
    phase = rng.uniform(0, 1)
    if family == "stripes":
        return (np.sin(2 * np.pi * (f * u + phase)) > 0).astype(np.float32)
    if family == "checkers":
        return ((np.floor(f * u + phase) + np.floor(f * v + phase)) % 2).astype(np.float32)
    if family == "dots":
        du, dv = (f * u + phase) % 1 - 0.5, (f * v + phase) % 1 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if family == "waves":
        return (np.sin(2 * np.pi * (f * u + 0.6 * np.sin(2 * np.pi * 2 * v) + phase)) > 0
                ).astype(np.float32)
    if family == "noise":   # random blocks about a third of a period wide
        cells = max(2, int(round(3 * f)))
        grid = (rng.random((cells, cells)) > 0.5).astype(np.uint8) * 255
        return np.asarray(Image.fromarray(grid).resize((w, h), Image.NEAREST), np.float32) / 255
    if family == "bricks":
        row = np.floor(f * v)
        uu = (f * 0.5 * u + 0.5 * (row % 2) + phase) % 1
        vv = (f * v) % 1
        return ((uu > 0.1) & (vv > 0.18)).astype(np.float32)
    if family == "zigzag":
        tri = np.abs(((f * 0.7 * v) % 1) - 0.5) * 2
        return (np.sin(2 * np.pi * (f * u + 0.8 * tri + phase)) > 0).astype(np.float32)
    if family == "grid":
        return ((((f * u + phase) % 1) < 0.2) | (((f * v + phase) % 1) < 0.2)).astype(np.float32)
    if family == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = np.hypot(yy - cy, xx - cx) / scale
        return (np.sin(2 * np.pi * (f * r + phase)) > 0).astype(np.float32)
    if family == "blotches":
        return (_value_noise(rng, hw, int(f * 0.6)) > 0.5).astype(np.float32)
    raise ValueError(f"unknown texture family {family!r}; known: {', '.join(TEXTURES)}")


def _colour_pair(rng):
    """Two random RGB colours far enough apart that the pattern stays visible."""
    while True:
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.abs(c1 - c2).sum() > 180:
            return c1.astype(np.float32), c2.astype(np.float32)


def textured(family, rng, hw):
    """float32 [H, W, 3] image of a texture family in two random colours."""
    pat = texture_pattern(family, rng, hw)[..., None]
    c1, c2 = _colour_pair(rng)
    return pat * c1 + (1 - pat) * c2


# ---------------------------------------------------------------- one image

def draw_texture_family(split: str, label: int, rng, p_dominant: float,
                        independent: bool = False) -> int:
    """The texture family of an image of class `label` in `split` (-1 for outline).

    independent: train/val families are uniform over all families, whatever the label.
    """
    n = len(TEXTURES)
    if split == "outline":
        return -1
    if independent and split != "conflict":
        return int(rng.integers(n))
    if split == "conflict" or rng.random() >= p_dominant:
        return int((label + rng.integers(1, n)) % n)     # any family but the class's own
    return label


def render(split: str, label: int, rng, spec: DatasetSpec) -> tuple[np.ndarray, int, str]:
    """(uint8 [H, W, 3] image of class `label`, its texture family (-1: none), its colour name)."""
    if spec.colour not in COLOUR_MODES:
        raise ValueError(f"unknown colour mode {spec.colour!r}; choose from "
                         f"{', '.join(COLOUR_MODES)}")
    hw = spec.hw
    h, w = hw
    side = min(h, w)
    family = draw_texture_family(split, label, rng, spec.p_dominant, spec.independent)
    radius = rng.uniform(0.3, 0.42) * side
    center = np.array([w, h]) / 2 + rng.uniform(-0.08, 0.08, 2) * side
    angle = rng.uniform(-np.pi / 6, np.pi / 6)
    mask = shape_mask(SHAPES[label], hw, center, radius, angle)
    colour = "grey" if spec.colour == "grey" else "random"
    if split == "outline":
        m = Image.fromarray((mask * 255).astype(np.uint8))
        k = max(3, (side // 32) | 1)
        edge = (np.asarray(m.filter(ImageFilter.MaxFilter(k)), np.float32)
                - np.asarray(m.filter(ImageFilter.MinFilter(k)), np.float32)) / 255.0
        if spec.colour == "random":
            paper = rng.uniform(200, 255, 3).astype(np.float32)
            ink = rng.uniform(0, 70, 3).astype(np.float32)
        else:
            paper, ink = np.full(3, 230, np.float32), np.full(3, 30, np.float32)
            colour = "grey"
        img = paper * (1 - edge[..., None]) + ink * edge[..., None]
    else:
        pat = texture_pattern(TEXTURES[family], rng, hw)[..., None]
        if spec.colour == "random":
            if rng.random() < 0.5:   # plain background
                bg = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (h, w, 3))
            else:                    # faint texture of a random family
                faint = textured(TEXTURES[rng.integers(len(TEXTURES))], rng, hw)
                bg = 0.3 * faint + 0.7 * rng.uniform(0, 255, 3).astype(np.float32)
            c1, c2 = _colour_pair(rng)
        else:
            bg = np.full((h, w, 3), BACKGROUND_LEVELS[rng.integers(len(BACKGROUND_LEVELS))],
                         np.float32)
            if spec.colour == "grey":
                c1, c2 = (np.full(3, v, np.float32) for v in GREY_LEVELS)
            else:
                colour, a, b = PALETTE[rng.integers(len(PALETTE))]
                c1, c2 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        fg = pat * c1 + (1 - pat) * c2
        img = fg * mask[..., None] + bg * (1 - mask[..., None])
    img += rng.normal(0, 4, img.shape).astype(np.float32)   # sensor noise: no flat JPEG blocks
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), family, colour


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: a function of (seed, split, index) only."""
    return np.random.default_rng([STREAM_DATA, seed, SPLITS.index(split), index])


def _make_one(args):
    spec, split, index, label, path = args
    img, family, colour = render(split, label, image_rng(spec.seed, split, index), spec)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=spec.quality)
    Path(path).write_bytes(buf.getvalue())
    return index, family, colour


# ---------------------------------------------------------------- the dataset

def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"output directory {out} is not empty; pass --force to replace it "
            "(nothing was written)")
    parent = out.parent if out.parent != Path("") else Path(".")
    parent_existing = parent
    while not parent_existing.exists():
        parent_existing = parent_existing.parent
    if not os.access(parent_existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {parent_existing} (needed for {out})")


def make_dataset(out, spec: DatasetSpec = DatasetSpec(), *, force: bool = False,
                 workers: int | None = None, progress: bool = True) -> Path:
    """Write every split of the dataset under `out`; returns `out`.

    The dataset is written into a sibling temporary folder and renamed into place at the end, so
    an interrupted run never leaves a half dataset that looks complete, and an existing dataset
    is only replaced (with force=True) once the new one is whole.
    """
    out = Path(out)
    _check_out_dir(out, force)
    if spec.images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {spec.images_per_class}")
    if spec.colour not in COLOUR_MODES:
        raise ValueError(f"unknown colour mode {spec.colour!r}; choose from "
                         f"{', '.join(COLOUR_MODES)}")
    if not spec.imagenet_like and spec.size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {spec.size}")
    with staged_dir(out) as tmp:
        _write_splits(tmp, spec, workers, progress, out.name)
    return out


def _write_splits(tmp: Path, spec: DatasetSpec, workers, progress, name) -> None:
    jobs, rows = [], {}
    for split in SPLITS:
        rows[split] = []
        for label, shape in enumerate(SHAPES):
            (tmp / split / shape).mkdir(parents=True, exist_ok=True)
        n = spec.count(split)
        for label, shape in enumerate(SHAPES):
            for j in range(n):
                index = label * n + j
                rel = f"{shape}/{shape}_{j:05d}.jpg"
                rows[split].append([rel, label, shape])
                jobs.append((spec, split, index, label, str(tmp / split / rel)))
    workers = workers or available_cpus()
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_make_one, jobs, chunksize=32)
        drawn = [(f, c) for _, f, c in tqdm(results, total=len(jobs), disable=not progress,
                                       desc=f"make-data {name}", unit="img")]
    k = 0
    for split in SPLITS:
        with open(tmp / split / "metadata.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["file", "label", "shape", "texture", "texture_class", "colour"])
            for rel, label, shape in rows[split]:
                fam, colour = drawn[k]
                k += 1
                wr.writerow([rel, label, shape, TEXTURES[fam] if fam >= 0 else "none", fam,
                             colour])
    (tmp / "README.txt").write_text(
        f"fastneg shapes dataset: seed={spec.seed} images_per_class={spec.images_per_class} "
        f"size={'x'.join(map(str, spec.hw))} p_dominant={spec.p_dominant} "
        f"colour={spec.colour} independent={spec.independent}\n")


def read_metadata(split_dir) -> list[dict]:
    """Rows of a split's metadata.csv, numbers as ints."""
    with open(Path(split_dir) / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"], r["texture_class"] = int(r["label"]), int(r["texture_class"])
    return rows


def default_data_root() -> Path:
    """Where commands look for the embedded dataset when none is given.

    $FASTNEG_DATA if set; else data/shapes in the source checkout; else the user cache folder.
    """
    if os.environ.get("FASTNEG_DATA"):
        return Path(os.environ["FASTNEG_DATA"])
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "data" / "shapes"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fastneg" / "shapes"


def ensure_dataset(root=None, spec: DatasetSpec = DatasetSpec()) -> Path:
    """`root` (default: default_data_root()), generated first if it holds no dataset."""
    root = Path(root) if root is not None else default_data_root()
    if not (root / "train" / "metadata.csv").exists():
        print(f"fastneg: generating the default dataset in {root} (once)", flush=True)
        make_dataset(root, spec)
    return root
