"""The paper's out-of-domain evaluation on the folders the public sets ship as.

One root (`fastneg eval --suite paper --ood-root DIR`) holds any of these, found by folder name
(case-insensitive, '_' read as '-'; docs/ood-eval.md lists every name):

    DIR/imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG   ImageNet-C as its tarballs unpack
    DIR/sketch/<wnid>/*.JPEG                                ImageNet-Sketch (1000 classes)
    DIR/stylized-imagenet/val/<wnid>/*.JPEG                 Stylized-ImageNet (or wnid folders)
    DIR/imagenet-r/<wnid>/*.jpg                             ImageNet-R (200 classes)
    DIR/cue-conflict/<category>/<shape><i>-<texture><j>.png Geirhos et al. 2019 stimuli

Every classified set is scored by the linear probe on the classes the model was trained on (the
train split's folder names): classes absent from training are dropped and counted, never
silently. ImageNet-C is scored on every (corruption, severity) folder present. The cue-conflict
stimuli give the shape bias: the probe's softmax over the training classes is averaged per
16-way category over the ImageNet-1k classes of Geirhos et al.'s released mapping (the covered
ones only), the decision is the argmax over the categories.

The work is split so that nothing is computed before every folder has been listed and checked:
prepare_paper_sets (discovery, listings, file checks), then score_paper_sets with a `classify`
callable (ImageList, tag) -> probabilities [N, number of training classes].
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from fastneg.data.files import available_cpus, check_files, require_readable
from fastneg.data.imagefolder import IMG_EXTENSIONS, ImageList, scan_image_folder
from fastneg.eval.metrics import shape_bias

# Hendrycks & Dietterich 2019: the 15 benchmark corruptions and the 4 of the "extra" tarball,
# which the authors hold out for validation; the headline mean uses the 15 only.
IMAGENET_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
              "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
              "elastic_transform", "pixelate", "jpeg_compression")
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)

# set key -> folder names accepted under the suite root (normalized: lower case, '_' -> '-').
SET_FOLDERS = {
    "imagenet-c": ("imagenet-c", "imagenetc", "in-c"),
    "sketch": ("sketch", "imagenet-sketch", "imagenetsketch"),
    "stylized": ("stylized-imagenet", "stylized", "sin"),
    "imagenet-r": ("imagenet-r", "imagenetr", "in-r"),
    "cue-conflict": ("cue-conflict", "style-transfer-preprocessed-512", "texture-vs-shape"),
}
CLASSIFIED = ("sketch", "stylized", "imagenet-r")   # plain wnid folders, scored by top-1
# The paper's column order (Ge et al. 2021, table 1), then the shape bias.
TABLE_COLUMNS = (("IN-val", None), ("IN-C", "imagenet-c"), ("Sketch", "sketch"),
                 ("Stylized", "stylized"), ("IN-R", "imagenet-r"), ("shape bias", "cue-conflict"))

Classify = Callable[[ImageList, str], np.ndarray]

_CUE_FILE = re.compile(r"^([a-z]+)(\d+)-([a-z]+)(\d+)\.png$")


# ------------------------------------------------------------------ package data

def _data_lines(name: str) -> list[str]:
    text = resources.files("fastneg.eval").joinpath("data", name).read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (data/imagenet1k_wnids.tsv)."""
    return tuple(ln.split("\t")[0] for ln in _data_lines("imagenet1k_wnids.tsv"))


@lru_cache(maxsize=None)
def category_wnids() -> dict[str, tuple[str, ...]]:
    """{category: its ImageNet-1k wnids} for the 16 cue-conflict categories, sorted by name
    (the order in which the released code breaks ties), from data/cue_conflict_categories.txt."""
    wnids = imagenet_wnids()
    out = {}
    for ln in _data_lines("cue_conflict_categories.txt"):
        name, _, indices = ln.partition(":")
        out[name.strip()] = tuple(wnids[int(i)] for i in indices.split())
    return dict(sorted(out.items()))


def category_columns(train_classes: Sequence[str]) -> dict[str, list[int]]:
    """{category: columns of the training classes among its wnids} for the covered categories
    (at least one of its wnids is a training class), in category order."""
    column = {c: i for i, c in enumerate(train_classes)}
    out = {}
    for cat, wnids in category_wnids().items():
        cols = [column[w] for w in wnids if w in column]
        if cols:
            out[cat] = cols
    return out


def category_decisions(probs: np.ndarray, columns: dict[str, list[int]]) -> np.ndarray:
    """int64 [N]: per row of `probs` [N, C] the index into `columns` (its key order) of the
    category whose mean probability over its columns is highest (first one on a tie)."""
    probs = np.asarray(probs, np.float64)
    means = np.stack([probs[:, cols].mean(1) for cols in columns.values()], 1)
    return means.argmax(1)


# ------------------------------------------------------------------ listings

@dataclass
class Restricted:
    """A set of class folders reduced to the training classes."""
    path: Path                    # the set's folder (as found)
    images: ImageList             # the kept classes' images (root: the folder or a view of it)
    classes_dropped: tuple[str, ...]
    images_dropped: int
    train_classes_absent: int     # training classes the set has no folder for

    def report(self) -> dict:
        return {"path": str(self.path), "images": len(self.images),
                "classes_scored": len(self.images.classes),
                "classes_dropped": len(self.classes_dropped), "images_dropped": self.images_dropped,
                "train_classes_absent": self.train_classes_absent}


@dataclass
class CueConflict:
    path: Path
    images: ImageList
    shape: tuple[str, ...]        # per image: shape category (its folder, = the file's prefix)
    texture: tuple[str, ...]      # per image: texture category (after the '-' in its name)


@dataclass
class PaperSets:
    """What prepare_paper_sets found, listed and checked; `close()` removes the view folders."""
    root: Path
    found: dict[str, Path]
    missing: list[str]
    sets: dict[str, Restricted] = field(default_factory=dict)
    imagenet_c: dict[tuple[str, int], Restricted] = field(default_factory=dict)
    imagenet_c_ignored: list[str] = field(default_factory=list)
    cue_conflict: CueConflict | None = None
    _views: Path | None = None

    def close(self) -> None:
        if self._views is not None:
            shutil.rmtree(self._views, ignore_errors=True)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _count_images(folder: Path) -> int:
    return sum(1 for _, _, names in os.walk(folder, followlinks=True)
               for n in names if n.lower().endswith(IMG_EXTENSIONS))


def discover(root) -> tuple[dict[str, Path], list[str]]:
    """({set key: folder to read}, [keys not found]) under `root` (see SET_FOLDERS)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--ood-root {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"--ood-root {root} is not a folder")
    alias = {a: key for key, names in SET_FOLDERS.items() for a in names}
    matches: dict[str, list[str]] = {}
    for name in _subdirs(root):
        key = alias.get(_norm(name))
        if key is not None:
            matches.setdefault(key, []).append(name)
    found = {}
    for key, names in matches.items():
        if len(names) > 1:
            raise ValueError(f"--ood-root {root} has {len(names)} folders for {key}: "
                             f"{', '.join(names)}; keep one")
        found[key] = _resolve(key, root / names[0])
    if not found:
        raise FileNotFoundError(
            f"--ood-root {root} holds none of the out-of-domain sets; expected any of the "
            f"folders {', '.join(names[0] for names in SET_FOLDERS.values())} (docs/ood-eval.md)")
    return found, [k for k in SET_FOLDERS if k not in found]


def _resolve(key: str, path: Path) -> Path:
    """The folder that holds a set's classes: unwraps the nesting its archive adds."""
    if key == "cue-conflict" and (path / "stimuli" / "style-transfer-preprocessed-512").is_dir():
        return path / "stimuli" / "style-transfer-preprocessed-512"   # the repository itself
    if key == "stylized" and (path / "val").is_dir():
        return path / "val"
    subs = _subdirs(path)
    if len(subs) == 1 and _norm(subs[0]) in SET_FOLDERS[key]:   # e.g. imagenet-sketch/sketch/
        return _resolve(key, path / subs[0])
    return path


def restrict(path: Path, train_classes: Sequence[str], views: Path, tag: str) -> Restricted:
    """The images of `path`'s class folders that are training classes. When some are dropped,
    the kept ones are listed through a folder of links (views/tag) so that the loaders read
    only them."""
    classes = _subdirs(path)
    if not classes:
        raise FileNotFoundError(f"{path} has no class sub-folders (expected {path}/<wnid>/<image>)")
    train = set(train_classes)
    keep = [c for c in classes if c in train]
    drop = tuple(c for c in classes if c not in train)
    if not keep:
        raise ValueError(f"none of the {len(classes)} classes of {path} ({', '.join(classes[:3])}"
                         f"{' ...' if len(classes) > 3 else ''}) is a training class (train: "
                         f"{', '.join(list(train_classes)[:3])} ...)")
    root = path
    if drop:
        root = views / tag
        root.mkdir(parents=True)
        for c in keep:
            os.symlink((path / c).resolve(), root / c, target_is_directory=True)
    images = scan_image_folder(root)
    return Restricted(path, images, drop, sum(_count_images(path / c) for c in drop),
                      len(train - set(keep)))


def _imagenet_c_folders(path: Path) -> tuple[dict[tuple[str, int], Path], list[str]]:
    known = IMAGENET_C + IMAGENET_C_EXTRA
    folders, ignored = {}, []
    for name in _subdirs(path):
        if name not in known:
            ignored.append(name)
            continue
        for sev_name in _subdirs(path / name):
            if sev_name in {str(s) for s in SEVERITIES}:
                folders[(name, int(sev_name))] = path / name / sev_name
            else:
                ignored.append(f"{name}/{sev_name}")
    if not folders:
        raise FileNotFoundError(
            f"no ImageNet-C folder in {path}: expected {path}/<corruption>/<1..5>/<wnid>/<image> "
            f"with corruptions among {', '.join(known)}")
    order = {c: i for i, c in enumerate(known)}
    return dict(sorted(folders.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))), ignored


def list_cue_conflict(path: Path) -> CueConflict:
    """The stimuli of `path`/<category>/<shape><i>-<texture><j>.png, cues parsed from the names."""
    images = scan_image_folder(path)
    cats = category_wnids()
    unknown = sorted(set(images.classes) - set(cats))
    if unknown:
        raise ValueError(f"{path} has folders that are not cue-conflict categories: "
                         f"{', '.join(unknown[:5])} (expected {', '.join(cats)})")
    shape, texture = [], []
    for f in images.files:
        folder, name = Path(f).parts[0], Path(f).name
        m = _CUE_FILE.match(name)
        if m is None or m.group(1) != folder or m.group(3) not in cats:
            raise ValueError(f"cue-conflict file {path / f} is not named <shape><i>-<texture><j>"
                             f".png with shape = its folder ({folder}) and a known texture "
                             "category")
        shape.append(m.group(1))
        texture.append(m.group(3))
    return CueConflict(path, images, tuple(shape), tuple(texture))


def _require_categories(path: Path, train_classes) -> dict[str, list[int]]:
    columns = category_columns(train_classes)
    if not columns:
        raise ValueError(f"cannot score the cue-conflict stimuli {path}: none of the 16 "
                         "categories has an ImageNet class among the training classes")
    return columns


def prepare_paper_sets(root, train_classes: Sequence[str], *, check: bool = True,
                       log=print) -> PaperSets:
    """Find, list and (check=True) inspect every set under `root` before anything is computed.

    Raises FileNotFoundError / NotADirectoryError / ValueError with one line naming the folder
    for a bad root, a root without any set, an empty set or a set without any training class.
    """
    found, missing = discover(root)
    plan = PaperSets(Path(root), found, missing)
    plan._views = Path(tempfile.mkdtemp(prefix="fastneg-ood-views-"))
    weakref.finalize(plan, shutil.rmtree, plan._views, True)   # removed even on an error
    listings: list[ImageList] = []
    if "imagenet-c" in found:
        folders, plan.imagenet_c_ignored = _imagenet_c_folders(found["imagenet-c"])
        for (name, sev), folder in folders.items():
            r = restrict(folder, train_classes, plan._views, f"imagenet-c-{name}-{sev}")
            plan.imagenet_c[(name, sev)] = r
            listings.append(r.images)
    for key in CLASSIFIED:
        if key in found:
            plan.sets[key] = restrict(found[key], train_classes, plan._views, key)
            listings.append(plan.sets[key].images)
    if "cue-conflict" in found:
        plan.cue_conflict = list_cue_conflict(found["cue-conflict"])
        _require_categories(plan.cue_conflict.path, train_classes)
        listings.append(plan.cue_conflict.images)
    if check:
        for images in listings:
            require_readable(check_files(images, available_cpus()), skip_bad=False)
    log(f"out-of-domain sets in {root}: {', '.join(found) or 'none'}"
        + (f"; not found: {', '.join(missing)}" if missing else ""))
    return plan


# ------------------------------------------------------------------ scoring

def _top1(probs: np.ndarray, images: ImageList, train_classes: Sequence[str]) -> float:
    column = {c: i for i, c in enumerate(train_classes)}
    labels = np.asarray([column[c] for c in images.classes], np.int64)[images.labels]
    return float((np.asarray(probs).argmax(1) == labels).mean())


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def score_imagenet_c(plan: PaperSets, train_classes, classify: Classify, log=print) -> dict:
    """Top-1 per (corruption, severity) present; means over the 15 benchmark corruptions
    ("mean", the paper's number), over the extra ones ("mean_extra") and over all."""
    top1: dict[str, dict[str, float]] = {}
    for (name, sev), r in plan.imagenet_c.items():
        acc = _top1(classify(r.images, f"imagenet-c-{name}-{sev}"), r.images, train_classes)
        top1.setdefault(name, {})[str(sev)] = acc
    for name, accs in top1.items():
        log(f"  IN-C {name:<18} " + "  ".join(f"s{s} {a:.3f}" for s, a in accs.items()))
    pairs = [(n, s, a) for n, accs in top1.items() for s, a in accs.items()]
    dropped = {c for r in plan.imagenet_c.values() for c in r.classes_dropped}
    scored = {c for r in plan.imagenet_c.values() for c in r.images.classes}
    return {
        "path": str(plan.found["imagenet-c"]),
        "mean": _mean(a for n, _, a in pairs if n in IMAGENET_C),
        "mean_extra": _mean(a for n, _, a in pairs if n in IMAGENET_C_EXTRA),
        "mean_all": _mean(a for _, _, a in pairs),
        "present": {n: [int(s) for s in accs] for n, accs in top1.items()},
        "missing_corruptions": [n for n in IMAGENET_C if n not in top1],
        "top1": top1,
        "per_corruption": {n: _mean(accs.values()) for n, accs in top1.items()},
        "per_severity": {str(s): _mean(a for n, ss, a in pairs if ss == str(s)
                                       and n in IMAGENET_C)
                         for s in SEVERITIES if any(ss == str(s) and n in IMAGENET_C
                                                    for n, ss, _ in pairs)},
        "images": sum(len(r.images) for r in plan.imagenet_c.values()),
        "classes_scored": len(scored), "classes_dropped": len(dropped),
        "images_dropped": sum(r.images_dropped for r in plan.imagenet_c.values()),
        "ignored_folders": plan.imagenet_c_ignored,
    }


def score_cue_conflict(cues: CueConflict, probs: np.ndarray, train_classes) -> dict:
    """Shape bias of the 16-way decisions (see module docstring) over the stimuli whose shape
    and texture categories differ and are both covered by the training classes."""
    columns = _require_categories(cues.path, train_classes)
    base = {"path": str(cues.path), "images": len(cues.images)}
    cats = list(columns)
    index = {c: i for i, c in enumerate(cats)}
    covered = np.asarray([s in index and t in index for s, t in zip(cues.shape, cues.texture)])
    decision = category_decisions(probs, columns)
    shape = np.asarray([index.get(s, -1) for s in cues.shape])
    texture = np.asarray([index.get(t, -1) for t in cues.texture])
    conflict = covered & (shape != texture)
    p, s, t = decision[conflict], shape[conflict], texture[conflict]
    by_shape, by_texture = int((p == s).sum()), int((p == t).sum())
    bias = shape_bias(p, shape=s, texture=t) if len(p) else float("nan")
    return {**base,
            "shape_bias": None if np.isnan(bias) else bias,
            "shape_decisions": by_shape, "texture_decisions": by_texture,
            "other_decisions": int(len(p) - by_shape - by_texture),
            "images_scored": int(conflict.sum()),
            "images_same_cue": int((covered & (shape == texture)).sum()),
            "images_dropped": int((~covered).sum()),
            "categories_scored": cats,
            "categories_not_covered": [c for c in category_wnids() if c not in index]}


def score_paper_sets(plan: PaperSets, train_classes: Sequence[str], classify: Classify, *,
                     in_val: float | None = None, log=print) -> dict:
    """Every set of `plan` scored with `classify` (ImageList, tag) -> probabilities over the
    training classes; `in_val`: the in-domain top-1 for the table. JSON-ready."""
    out: dict = {"root": str(plan.root), "found": {k: str(v) for k, v in plan.found.items()},
                 "missing": list(plan.missing)}
    try:
        if plan.imagenet_c:
            out["imagenet-c"] = score_imagenet_c(plan, train_classes, classify, log=log)
        for key, r in plan.sets.items():
            acc = _top1(classify(r.images, key), r.images, train_classes)
            out[key] = {"top1": acc, **r.report()}
            log(f"  {key:<12} linear {acc:.3f}  ({len(r.images)} images, "
                f"{len(r.images.classes)} classes; dropped {len(r.classes_dropped)} classes, "
                f"{r.images_dropped} images)")
        if plan.cue_conflict is not None:
            probs = classify(plan.cue_conflict.images, "cue-conflict")
            cc = out["cue-conflict"] = score_cue_conflict(plan.cue_conflict, probs, train_classes)
            sb = cc["shape_bias"]
            log(f"  cue-conflict shape bias {'-' if sb is None else f'{sb:.3f}'} "
                f"({cc['images_scored']} images, {len(cc['categories_scored'])} categories; "
                f"dropped {cc['images_dropped']})")
    finally:
        plan.close()
    table = {"IN-val": in_val}
    for column, key in TABLE_COLUMNS[1:]:
        entry = out.get(key) or {}
        table[column] = entry.get("mean" if key == "imagenet-c" else
                                  "shape_bias" if key == "cue-conflict" else "top1")
    out["table"] = table
    return out


def paper_table(paper: dict, label: str = "this run") -> str:
    """Markdown table in the paper's column order: top-1 in %, shape bias as a fraction, '-' for
    a set not found (named below the table)."""
    cells = []
    for column, _ in TABLE_COLUMNS:
        v = paper["table"].get(column)
        cells.append("-" if v is None else f"{v:.3f}" if column == "shape bias"
                     else f"{100 * v:.2f}")
    lines = ["| model | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |",
             "|---" * (len(TABLE_COLUMNS) + 1) + "|",
             f"| {label} | " + " | ".join(cells) + " |"]
    if paper.get("missing"):
        lines.append(f"not found under {paper['root']}: {', '.join(paper['missing'])}")
    return "\n".join(lines)
