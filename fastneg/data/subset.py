"""`fastneg make-subset`: a class subset of ImageNet-1k (ImageNet-100 by default) as a tree of
links, train and val, in the ImageFolder layout every fastneg loader reads:

    OUT/train/<wnid>/<file>     one link per training image of the chosen classes
    OUT/val/<wnid>/<file>       one link per validation image of the chosen classes

IN1K may be laid out in either of the ways ImageNet-1k is distributed:

    IN1K/train/<wnid>/*.JPEG and IN1K/val/...                       (image-net.org, untarred)
    IN1K/ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG, .../val/...       (Kaggle), with
    IN1K/LOC_val_solution.csv beside ILSVRC/

and val either in class folders (val/<wnid>/*.JPEG) or flat (val/ILSVRC2012_val_00000001.JPEG,
...) with the ground truth in LOC_val_solution.csv (columns ImageId,PredictionString; the first
token of PredictionString is the image's wnid), found in IN1K (or beside train/ and val/) or
given with --val-csv. A flat val becomes class folders of links.

Everything is checked before anything is written: a class absent from train or val, a val image
the CSV names but the folder lacks, a flat val without a CSV is one error naming them. The tree
is built in a hidden sibling of OUT and renamed into place when complete.
"""
from __future__ import annotations

import csv
import errno
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastneg.data.imagefolder import IMG_EXTENSIONS
from fastneg.fs import staged_dir
from fastneg.progress import tqdm

BUILTIN_LISTS = {"in100": "imagenet100.txt"}   # --classes NAME -> package data file
WNID = re.compile(r"n\d{8}")
VAL_CSV = "LOC_val_solution.csv"
LINKS = ("symlink", "hardlink")
KAGGLE_ROOT = Path("ILSVRC", "Data", "CLS-LOC")


# ---------------------------------------------------------------- class lists

def parse_class_list(text: str, source: str) -> list[str]:
    """The wnids of a class list: one per line, '#' starts a comment, blank lines skipped.

    ValueError naming `source` and the line for an entry that is not a wnid (n + 8 digits),
    for a repeated wnid, and for a list with no entry.
    """
    wnids, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not WNID.fullmatch(entry):
            raise ValueError(f"{source} line {number}: {entry!r} is not an ImageNet class id "
                             "(a WordNet id such as n01440764)")
        if entry in seen:
            raise ValueError(f"{source} line {number}: {entry} is listed twice "
                             f"(first on line {seen[entry]})")
        seen[entry] = number
        wnids.append(entry)
    if not wnids:
        raise ValueError(f"{source} lists no class")
    return wnids


def read_classes(spec: str) -> tuple[list[str], str]:
    """(wnids, label) for --classes: a built-in list's name (in100) or a file of wnids."""
    if spec in BUILTIN_LISTS:
        text = resources.files("fastneg.data").joinpath(BUILTIN_LISTS[spec]).read_text()
        return parse_class_list(text, spec), spec
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--classes {spec}: neither a built-in list "
                                f"({', '.join(BUILTIN_LISTS)}) nor an existing file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"--classes {spec} is not a text file of class ids") from None
    return parse_class_list(text, str(path)), str(path)


# ---------------------------------------------------------------- the source tree

@dataclass(frozen=True)
class Source:
    """Where an ImageNet-1k copy keeps its splits: train and val folders, and the val ground
    truth CSV when there is one."""
    train: Path
    val: Path
    val_csv: Path | None


def locate(in1k, val_csv=None) -> Source:
    """The train and val folders of IN1K (plain or Kaggle layout) and the val CSV: `val_csv`
    when given, else LOC_val_solution.csv in IN1K or beside train/ and val/ (None if absent)."""
    in1k = Path(in1k)
    if not in1k.is_dir():
        raise NotADirectoryError(f"IN1K {in1k} is not a folder")
    for base in (in1k, in1k / KAGGLE_ROOT):
        if (base / "train").is_dir():
            break
    else:
        raise FileNotFoundError(f"IN1K {in1k} holds neither train/ nor {KAGGLE_ROOT}/train/ "
                                "(Kaggle layout)")
    if not (base / "val").is_dir():
        raise FileNotFoundError(f"no val split: {base / 'val'} is not a folder")
    if val_csv is not None:
        val_csv = Path(val_csv)
        if not val_csv.is_file():
            raise FileNotFoundError(f"--val-csv {val_csv} does not exist")
    else:
        val_csv = next((p for p in (in1k / VAL_CSV, base / VAL_CSV) if p.is_file()), None)
    return Source(base / "train", base / "val", val_csv)


def _images_in(folder: Path) -> list[str]:
    """Sorted names of the image files directly in `folder` ([] when it does not exist)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".")
                  and e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file())


def _val_is_flat(val: Path) -> bool:
    """Whether val holds its images directly (ILSVRC2012_val_*.JPEG) rather than in class
    folders: it has no sub-folder named like a wnid."""
    return not any(e.is_dir() and WNID.fullmatch(e.name) for e in os.scandir(val))


def _val_from_csv(val: Path, csv_path: Path, wanted: set[str]):
    """({wnid: [file names]}, [image ids the CSV names but val lacks]) for the wanted classes,
    from an ILSVRC LOC_val_solution.csv."""
    present = {Path(name).stem: name for name in _images_in(val)}
    by_class, missing = {}, []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:   # a BOM is tolerated
            rows = csv.reader(fh)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId",
                                                                       "PredictionString"]:
                raise ValueError(f"{csv_path}: expected the header ImageId,PredictionString "
                                 f"(ILSVRC's {VAL_CSV}), got {header}")
            for line, row in enumerate(rows, 2):
                if not row:
                    continue
                tokens = row[1].split() if len(row) > 1 else []
                if not tokens or not WNID.fullmatch(tokens[0]):
                    raise ValueError(f"{csv_path} line {line}: no class id at the start of "
                                     f"PredictionString ({row})")
                if tokens[0] not in wanted:
                    continue
                image_id = row[0].strip()
                if image_id in present:
                    by_class.setdefault(tokens[0], []).append(present[image_id])
                else:
                    missing.append(image_id)
    except UnicodeDecodeError:
        raise ValueError(f"{csv_path} is not a text CSV") from None
    return {c: sorted(set(f)) for c, f in by_class.items()}, missing


def _few(items, n: int = 5) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass(frozen=True)
class Plan:
    """What make_subset links: (source file, path under OUT) per image, and the counts."""
    links: list[tuple[Path, str]]
    classes: list[str]
    train_images: int
    val_images: int
    val_layout: str          # "folders" or "flat + CSV"


def plan_subset(source: Source, classes: list[str]) -> Plan:
    """Every link to make, or one ValueError naming every problem (missing classes in train or
    val, val images named by the CSV but absent, a flat val without a CSV)."""
    problems, links = [], []
    n_train = n_val = 0
    absent = []
    for wnid in classes:
        files = _images_in(source.train / wnid)
        if not files:
            absent.append(wnid)
        links += [(source.train / wnid / f, f"train/{wnid}/{f}") for f in files]
        n_train += len(files)
    if absent:
        tars = [w for w in absent if (source.train / f"{w}.tar").is_file()]
        problems.append(f"{len(absent)} of {len(classes)} classes have no images in "
                        f"{source.train}: {_few(absent)}"
                        + (" (still .tar archives: untar them into class folders)" if tars
                           else ""))
    flat = _val_is_flat(source.val)
    if flat and source.val_csv is None:
        problems.append(f"{source.val} holds its images without class folders and no "
                        f"{VAL_CSV} was found in IN1K or beside it; give it with --val-csv")
    else:
        if flat:
            by_class, missing = _val_from_csv(source.val, source.val_csv, set(classes))
            if missing:
                problems.append(f"{len(missing)} val images listed in {source.val_csv} are "
                                f"missing from {source.val}: {_few(missing)}")
        else:
            by_class = {w: _images_in(source.val / w) for w in classes}
        absent = [w for w in classes if not by_class.get(w)]
        if absent:
            problems.append(f"{len(absent)} of {len(classes)} classes have no val images in "
                            f"{source.val}" + (f" (per {source.val_csv})" if flat else "")
                            + f": {_few(absent)}")
        for wnid in classes:
            files = by_class.get(wnid, [])
            links += [(source.val / (f if flat else f"{wnid}/{f}"), f"val/{wnid}/{f}")
                      for f in files]
            n_val += len(files)
    if problems:
        raise ValueError("cannot make the subset: " + "; ".join(problems))
    return Plan(links, list(classes), n_train, n_val, "flat + CSV" if flat else "folders")


# ---------------------------------------------------------------- building it

def _check_out(out: Path, in1k: Path, force: bool) -> None:
    """FileExistsError for an existing OUT without force; ValueError for an OUT that is IN1K
    or holds it (replacing it would delete the source), or is not a folder."""
    out_abs, in_abs = out.resolve(), in1k.resolve()
    if out_abs == in_abs or out_abs in in_abs.parents or in_abs in out_abs.parents:
        raise ValueError(f"OUT {out} overlaps IN1K {in1k}; choose a folder outside it")
    if out.exists() or out.is_symlink():
        if not force:
            raise FileExistsError(f"OUT {out} exists; pass --force to replace it")
        if out.is_symlink() or not out.is_dir():
            raise ValueError(f"OUT {out} exists and is not a folder; remove it yourself")


def _link(src: Path, dst: Path, kind: str) -> None:
    if kind == "symlink":
        os.symlink(os.path.abspath(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise ValueError(f"--link hardlink: {dst.parent} is on another file system than "
                             f"{src}; use --link symlink or an OUT on the same one") from None
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP):
            raise PermissionError(f"--link hardlink: cannot hard-link {src} "
                                  f"({e.strerror}); use --link symlink") from None
        raise


def make_subset(in1k, out, classes: list[str], *, link: str = "symlink", val_csv=None,
                force: bool = False, progress: bool = True) -> Plan:
    """Build OUT/train/<wnid>/... and OUT/val/<wnid>/... as links into IN1K for `classes`.

    Symlinks point at absolute paths (OUT can move; IN1K cannot); hard links need OUT on IN1K's
    file system. All checks run before anything is created; OUT appears only when complete.
    Returns the plan that was carried out.
    """
    if link not in LINKS:
        raise ValueError(f"--link must be one of {', '.join(LINKS)}, got {link!r}")
    in1k, out = Path(in1k), Path(out)
    source = locate(in1k, val_csv)
    _check_out(out, in1k, force)
    plan = plan_subset(source, classes)
    with staged_dir(out) as tmp:
        for wnid in plan.classes:
            (tmp / "train" / wnid).mkdir(parents=True)
            (tmp / "val" / wnid).mkdir(parents=True)
        with tqdm(total=len(plan.links), unit="link", desc="make-subset",
                  disable=not progress) as bar:
            for src, rel in plan.links:
                try:
                    _link(src, tmp / rel, link)
                except (ValueError, PermissionError):
                    raise
                except OSError as e:   # a full disk, a quota, an inode limit: one line
                    raise ValueError(f"cannot create the link {out / rel} -> {src}: "
                                     f"{e.strerror or e}") from None
                bar.update()
    return plan


def register(sub) -> None:
    m = sub.add_parser(
        "make-subset", help="link a class subset of ImageNet-1k (ImageNet-100 by default)",
        description="Build OUT/train/<wnid>/ and OUT/val/<wnid>/ as links into an ImageNet-1k "
                    "copy, for the classes of --classes. IN1K holds train/ and val/, or is a "
                    "Kaggle download (ILSVRC/Data/CLS-LOC/{train,val} with LOC_val_solution.csv "
                    "beside ILSVRC/). val may be in class folders or flat with "
                    "LOC_val_solution.csv (then sorted into class folders). Nothing is written "
                    "unless every class and file is found.")
    m.add_argument("in1k", metavar="IN1K", help="ImageNet-1k root (see above)")
    m.add_argument("out", metavar="OUT", help="folder to create (must not exist, see --force)")
    m.add_argument("--classes", default="in100",
                   help="'in100' (the 100 classes of CMC, Tian et al. 2019, used by the paper) "
                        "or a text file of wnids, one per line, '#' comments allowed "
                        "(default: in100)")
    m.add_argument("--link", choices=LINKS, default="symlink",
                   help="symlink (absolute paths; default) or hardlink (OUT on IN1K's file "
                        "system; survives IN1K being moved)")
    m.add_argument("--val-csv", help=f"ILSVRC {VAL_CSV} for a flat val folder (default: "
                                     "looked for in IN1K and beside train/ and val/)")
    m.add_argument("--force", action="store_true", help="replace an existing OUT folder")
    m.set_defaults(func=run)


def run(args) -> None:
    classes, label = read_classes(args.classes)
    plan = make_subset(args.in1k, args.out, classes, link=args.link, val_csv=args.val_csv,
                       force=args.force)
    print(f"wrote {args.out}: {len(plan.classes)} classes ({label}), {plan.train_images} "
          f"train and {plan.val_images} val images as {args.link}s "
          f"(val from {plan.val_layout})")
