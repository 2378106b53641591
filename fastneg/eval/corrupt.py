"""ImageNet-C style corruptions of an evaluation split, computed once and cached as ImageFolders.

Layout of the cache: OUT/<corruption>/<severity>/<class>/<image>.png plus OUT/manifest.json.
PNG because a lossy format would add its own corruption on top of the chosen one.

corrupt-tta draws from NumPy's global generator, so each (image, corruption, severity) gets its
own seed from the project's counter-based RNG and the global state is restored afterwards: the
cache is the same bytes whatever the worker count or order.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fastneg.data.files import available_cpus
from fastneg.data.imagefolder import scan_image_folder
from fastneg.fs import staged_dir
from fastneg.kernels.rng import STREAM_CORRUPT, mix, slot

# A fast, representative subset of the ImageNet-C families at 32-96 px: noise, blur (2),
# weather, digital (3). Every corruption-tta name is accepted.
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "motion_blur", "fog", "contrast",
                       "jpeg_compression", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)


def _corrupt_tta():
    """The corrupt-tta module, an optional dependency (fastneg[eval]) imported on use; ValueError
    (one line) where it is not installed."""
    try:
        import corrupt_tta
    except ImportError:
        raise ValueError("the corruption evaluation needs corrupt-tta "
                         "(pip install 'fastneg[eval]', or pass --corruptions none)") from None
    return corrupt_tta


def corruption_names() -> tuple[str, ...]:
    """Every corruption corrupt-tta provides, in its own (stable) order."""
    return tuple(f.__name__ for f in _corrupt_tta().corruption_tuple)


def check_corruptions(names, severities) -> tuple[tuple[str, ...], tuple[int, ...]]:
    known = corruption_names()
    names, severities = tuple(names), tuple(int(s) for s in severities)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(known)}")
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad or not severities:
        raise ValueError(f"severities must be integers in 1..5; got {severities}")
    return names, severities


def corrupt_image(img: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: `img` corrupted by `name` at `severity`, NumPy's global state untouched."""
    corrupt_tta = _corrupt_tta()
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = corrupt_tta.corrupt(img, severity=severity, corruption_name=name)
    finally:
        np.random.set_state(state)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _corrupt_one(job):
    """Every (corruption, severity) of one image, written as PNGs."""
    src, rel, index, names, severities, seed, out = job
    img = np.asarray(Image.open(src).convert("RGB"))
    known = corruption_names()
    stem = Path(rel).with_suffix(".png")
    for name in names:
        for sev in severities:
            s = mix(seed, known.index(name), index, slot(STREAM_CORRUPT, sev))
            dst = Path(out) / name / str(sev) / stem
            Image.fromarray(corrupt_image(img, name, sev, s)).save(dst, format="PNG")


def cache_key(listing: str, names, severities, seed) -> str:
    """What the cache depends on: the split's listing fingerprint, the corruptions, the seed."""
    corrupt_tta = _corrupt_tta()
    text = json.dumps([listing, list(names), list(severities), seed, corrupt_tta.__version__])
    return hashlib.sha256(text.encode()).hexdigest()


def corrupt_split(split_dir, out, *, corruptions=DEFAULT_CORRUPTIONS, severities=SEVERITIES,
                  seed: int = 0, workers: int | None = None) -> Path:
    """Write (once) every corruption x severity of the ImageFolder `split_dir` under `out`.

    Returns `out`. A cache whose manifest matches is reused as is; anything else at `out` is
    replaced. Written into a sibling temporary folder and renamed, so an interrupted run never
    leaves a cache that looks complete.
    """
    names, severities = check_corruptions(corruptions, severities)
    images = scan_image_folder(split_dir)
    out = Path(out)
    key = cache_key(images.fingerprint(), names, severities, seed)
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("key") == key:
        return out
    with staged_dir(out) as tmp:
        for name in names:
            for sev in severities:
                for rel in {str(Path(f).parent) for f in images.files}:
                    (tmp / name / str(sev) / rel).mkdir(parents=True, exist_ok=True)
        jobs = [(str(images.path(i)), images.files[i], i, names, severities, seed, str(tmp))
                for i in range(len(images))]
        workers = workers or available_cpus()
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_corrupt_one, jobs, chunksize=16))
        (tmp / "manifest.json").write_text(json.dumps(
            {"key": key, "source": str(split_dir), "corruptions": names,
             "severities": severities, "seed": seed, "images": len(images)}, indent=1))
    return out
