"""The evaluation of one frozen backbone on a dataset root: linear probe and kNN on every split,
corruptions of val, shape bias on the cue-conflict split, extra out-of-domain folders.

    ROOT/train        fits the probe and is the kNN memory
    ROOT/<split>      every other ImageFolder under ROOT is evaluated (val, conflict, outline, ...)
    ROOT/val          is also corrupted (ImageNet-C style) and reported as the split "corrupt"
    ROOT/conflict     with a metadata.csv (label, shape, texture_class) gives the shape bias
    ROOT/*/metadata.csv  with factor columns (shape, texture, colour) gives linear read-outs
                      per factor, fitted on train (regularization by CV on train), scored on val

plus the scramble similarity on val (fastneg.eval.readout) and, for a checkpoint, the same
numbers for the untrained network of the same architecture (computed once per dataset, cached).
"""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from fastneg.data.files import available_cpus, check_files, require_readable
from fastneg.data.imagefolder import ImageList, scan_image_folder
from fastneg.eval.corrupt import (DEFAULT_CORRUPTIONS, SEVERITIES, check_corruptions,
                                  corrupt_split)
from fastneg.eval.features import cached_feature_shards, extract_features, file_digest
from fastneg.eval.knn import knn_predict_chunked
from fastneg.eval.linear import fit_linear_probe
from fastneg.eval.metrics import shape_bias, top1
from fastneg.eval.readout import readouts, scramble_patch_range, scramble_similarity
from fastneg.fs import write_text_atomic

CORRUPT = "corrupt"   # the split name under which the corruption mean is reported


def find_splits(root) -> dict[str, Path]:
    """The ImageFolder sub-folders of `root` other than train (hidden folders skipped)."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"no train split: {root / 'train'} is not a folder "
                                "(--data must hold train/ and the evaluation splits)")
    splits = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and entry.name != "train" and not entry.name.startswith("."):
            has_classes = any(e.is_dir() for e in os.scandir(entry.path))
            if has_classes:
                splits[entry.name] = Path(entry.path)
    return splits


def aligned_labels(images: ImageList, train_classes, name: str) -> torch.Tensor:
    """Labels of `images` as indices into the training classes (matched by folder name)."""
    unknown = sorted(set(images.classes) - set(train_classes))
    if unknown:
        raise ValueError(f"split {name!r} ({images.root}) has classes the train split lacks: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    index = {c: i for i, c in enumerate(train_classes)}
    remap = np.asarray([index[c] for c in images.classes], np.int64)
    return torch.from_numpy(remap[images.labels])


def conflict_cues(images: ImageList, train_classes) -> tuple[np.ndarray, np.ndarray] | None:
    """(shape, texture) class ids per image of a cue-conflict split, from its metadata.csv.

    metadata.csv numbers classes its own way (label, with the class name in `shape`);
    texture_class uses the same numbering, so both are mapped to train class ids by name.
    """
    from fastneg.data.synthetic import read_metadata
    if not (images.root / "metadata.csv").exists():
        return None
    rows = read_metadata(images.root)
    if not rows or "texture_class" not in rows[0]:
        return None
    name_of = {r["label"]: r["shape"] for r in rows}
    index = {c: i for i, c in enumerate(train_classes)}
    by_file = {Path(r["file"]).as_posix(): r for r in rows}
    shape, texture = [], []
    for f in images.files:
        r = by_file.get(Path(f).as_posix())
        if r is None:
            raise ValueError(f"{images.root / 'metadata.csv'} has no row for {f}")
        shape.append(index[name_of[r["label"]]])
        texture.append(index[name_of[r["texture_class"]]])
    return np.asarray(shape), np.asarray(texture)


def parse_ood(specs) -> dict[str, Path]:
    """{"NAME": DIR} from ["NAME=DIR", ...] (the --ood flags)."""
    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--ood expects NAME=DIR, got {spec!r}")
        if name in out or name in ("train", CORRUPT):
            raise ValueError(f"--ood name {name!r} is reserved or given twice")
        out[name] = Path(path)
    return out


def evaluate_backbone(backbone: torch.nn.Module, data_root, *, size: int, ood=None,
                      cache_dir=None, identity: str = "", corrupt_dir=None,
                      corruptions=DEFAULT_CORRUPTIONS, severities=SEVERITIES,
                      k: int = 20, temperature: float = 0.07, batch_size: int = 256,
                      device="cpu", scramble_range=None, ood_root=None, log=print) -> dict:
    """Every metric of the module docstring for `backbone` (maps normalized images to features).

    Features are cached under `cache_dir` (None: not cached) with a key made of `identity` (what
    the backbone is, e.g. its checkpoint's digest), the split's listing and `size`.
    `corruptions=()` skips the corruption suite. `scramble_range` (LO, HI): patch sides of the
    scramble similarity on val (None: not measured). `ood_root`: a folder holding the paper's
    out-of-domain sets by their usual names (fastneg.eval.ood), scored by the linear probe under
    the key "paper" (None: not scored).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0; got k={k}, "
                         f"temperature={temperature}")
    if corruptions:   # before any feature is extracted: a typo should cost nothing
        corruptions, severities = check_corruptions(corruptions, severities)
    root = Path(data_root)
    splits = find_splits(root)
    for name, path in (ood or {}).items():
        if name in splits:
            raise ValueError(f"--ood name {name!r} clashes with the split {root / name}")
        splits[name] = path
    if not splits and ood_root is None:
        raise ValueError(f"nothing to score in {root}: it holds train/ only; add an evaluation "
                         f"split ({root}/val/<class>/<image>), --ood NAME=DIR or --ood-root DIR")
    # Every split's files are checked before any feature is computed: a bad file costs nothing
    # (train's are checked by its feature loader, the first thing to run).
    train = scan_image_folder(root / "train")
    listings = {name: scan_image_folder(path) for name, path in splits.items()}
    for images in listings.values():
        require_readable(check_files(images, available_cpus()), skip_bad=False)
    paper = _prepare_paper(ood_root, train.classes, log)
    if corruptions and "val" in splits:   # written (once) before the features, too
        _write_corruptions(splits["val"], corrupt_dir or root / ".fastneg-corrupt" / "val",
                           corruptions, severities)
    n_cls = len(train.classes)

    def features(images: ImageList, tag: str) -> torch.Tensor:
        if cache_dir is None:
            return extract_features(backbone, images, size=size, batch_size=batch_size,
                                    device=device)
        key = hashlib.sha256(f"{identity}|{images.fingerprint()}|{size}".encode()).hexdigest()
        return cached_feature_shards(backbone, images, size=size, key=key,
                                     batch_size=batch_size, device=device,
                                     folder=Path(cache_dir) / tag)

    train_y = torch.from_numpy(train.labels)
    train_f = features(train, "train")
    probe = fit_linear_probe(train_f, train_y, num_classes=n_cls, device=device)

    def predict(feats):
        return {"linear": probe.predict(feats).numpy(),
                "knn": knn_predict_chunked(train_f, train_y, feats, num_classes=n_cls, k=k,
                                           temperature=temperature, device=device).numpy()}

    result = {"data": str(root), "size": size, "train_images": len(train),
              "linear": {}, "knn": {}, "images": {}}
    for name, images in listings.items():
        labels = aligned_labels(images, train.classes, name).numpy()
        feats = features(images, name)
        preds = predict(feats)
        if name == "val":
            detail = readouts(train, train_f, images, feats)
            if detail:
                result["readout"] = {f: d["accuracy"] for f, d in detail.items()}
                result["readout_detail"] = detail
                log("  read-out     " + "  ".join(f"{f} {a:.3f}"
                                                   for f, a in result["readout"].items()))
            if scramble_range is not None:
                result["scramble_similarity"] = scramble_similarity(
                    backbone, images, size=size, patch_range=scramble_range,
                    batch_size=batch_size, device=device)
                result["scramble_patch_range"] = list(scramble_range)
                log(f"  scramble similarity {result['scramble_similarity']:.3f} "
                    f"(patch sides {scramble_range[0]}..{scramble_range[1]})")
        for clf in ("linear", "knn"):
            result[clf][name] = top1(preds[clf], labels)
        result["images"][name] = len(images)
        log(f"  {name:<12} linear {result['linear'][name]:.3f}  knn {result['knn'][name]:.3f}"
            f"  ({len(images)} images)")
        cues = conflict_cues(images, train.classes) if name == "conflict" else None
        if cues is not None:
            for clf, suffix in (("linear", ""), ("knn", "_knn")):
                bias = shape_bias(preds[clf], shape=cues[0], texture=cues[1])
                result["shape_bias" + suffix] = None if np.isnan(bias) else bias   # JSON null
                result["texture_match" + suffix] = float((preds[clf] == cues[1]).mean())
    if paper is not None:
        result["paper"] = _score_paper(paper, train.classes, probe, features,
                                       result["linear"].get("val"), log)
    if corruptions and "val" in splits:
        detail = _corruption_suite(splits["val"], corrupt_dir or root / ".fastneg-corrupt" / "val",
                                   corruptions, severities, train.classes, features, predict)
        for clf in ("linear", "knn"):
            result[clf][CORRUPT] = float(np.mean([a for accs in detail[clf].values()
                                                  for a in accs]))
        result["corruptions"] = detail
        log(f"  {CORRUPT:<12} linear {result['linear'][CORRUPT]:.3f}  knn "
            f"{result['knn'][CORRUPT]:.3f}  ({len(corruptions)} corruptions x "
            f"{len(severities)} severities of val)")
    return result


def _prepare_paper(ood_root, train_classes, log):
    """fastneg.eval.ood's sets under `ood_root`, listed and checked (None: no root given)."""
    if ood_root is None:
        return None
    from fastneg.eval.ood import prepare_paper_sets
    return prepare_paper_sets(ood_root, train_classes, log=log)


def _score_paper(paper, train_classes, probe, features, in_val, log) -> dict:
    """The paper's out-of-domain numbers: the linear probe's softmax on each set's features."""
    from fastneg.eval.ood import score_paper_sets

    def classify(images, tag):
        return torch.softmax(probe.logits(features(images, f"ood-{tag}")).float(), 1).numpy()

    return score_paper_sets(paper, train_classes, classify, in_val=in_val, log=log)


def _corruption_suite(val_dir, corrupt_dir, corruptions, severities, train_classes,
                      features, predict) -> dict:
    """{"names", "severities", "linear": {name: [top1 per severity]}, "knn": {...}}."""
    corrupt_dir = Path(corrupt_dir)
    _write_corruptions(val_dir, corrupt_dir, corruptions, severities)
    detail = {"linear": {}, "knn": {}}
    for name in corruptions:
        for clf in detail:
            detail[clf][name] = []
        for sev in severities:
            images = scan_image_folder(corrupt_dir / name / str(sev))
            labels = aligned_labels(images, train_classes, f"{CORRUPT}/{name}/{sev}").numpy()
            preds = predict(features(images, f"{CORRUPT}-{name}-{sev}"))
            for clf in detail:
                detail[clf][name].append(top1(preds[clf], labels))
    return {"names": list(corruptions), "severities": list(severities), **detail}


def _write_corruptions(val_dir, corrupt_dir, corruptions, severities) -> None:
    """corrupt_split, with a one-line error for a folder that cannot be written (permissions or
    a read-only file system)."""
    try:
        corrupt_split(val_dir, corrupt_dir, corruptions=corruptions, severities=severities)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PermissionError(f"cannot write the corruption cache {corrupt_dir} "
                              f"({e.strerror or e}); choose a writable folder with "
                              "--corrupt-dir") from None


def evaluate_checkpoint(checkpoint, data_root, *, cache_dir=None, device="cpu",
                        untrained: bool = True, untrained_dir=None, arch=None, size=None,
                        **kwargs) -> dict:
    """evaluate_backbone on a trainer checkpoint, or on a backbone file of `fastneg export`
    (arch and size from its metadata, else from `arch` and `size`: fastneg.export.load_backbone);
    features cached in RUN_DIR/eval-cache/<name>.

    The scramble similarity uses patch sides just above the run's training range. untrained:
    also report the untrained network's numbers (key "untrained"), computed once per dataset,
    architecture and size and cached in `untrained_dir` (default ROOT/.fastneg-untrained).
    """
    from fastneg.export import load_backbone
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    backbone, args = load_backbone(checkpoint, device=device, arch=arch, size=size)
    size = int(args["size"])
    scramble = scramble_patch_range(args.get("patch_range") or (2, max(2, size // 4)), size)
    cache_dir = cache_dir or checkpoint.parent / "eval-cache" / checkpoint.stem
    result = evaluate_backbone(backbone, data_root, size=size, cache_dir=cache_dir,
                               identity=file_digest(checkpoint), device=device,
                               scramble_range=scramble, **kwargs)
    out = {"checkpoint": str(checkpoint), "args": dict(args), **result}
    if untrained:
        keep = {k: v for k, v in kwargs.items() if k in ("k", "temperature", "batch_size")}
        out["untrained"] = untrained_reference(
            args["arch"], size, bool(args.get("cifar_stem", False)), data_root,
            scramble_range=scramble, cache_dir=untrained_dir, device=device, **keep)
    return out


def dataset_digest(root) -> str:
    """sha256 of a dataset's listings and metadata files: changes when the data are remade."""
    root = Path(root)
    h = hashlib.sha256()
    for name in ["train", *find_splits(root)]:
        h.update(scan_image_folder(root / name).fingerprint().encode())
        meta = root / name / "metadata.csv"
        if meta.exists():
            h.update(meta.read_bytes())
    if (root / "README.txt").exists():
        h.update((root / "README.txt").read_bytes())
    return h.hexdigest()


def untrained_reference(arch: str, size: int, cifar_stem: bool, data_root, *, scramble_range,
                        cache_dir=None, device="cpu", seed: int = 0, log=print,
                        **kwargs) -> dict:
    """evaluate_backbone (no corruptions) of a freshly initialized backbone (torch seed `seed`).

    The result is cached as JSON in `cache_dir` (default ROOT/.fastneg-untrained), keyed by the
    dataset's digest, the architecture, size, stem, seed and scramble range, so it is computed
    once per dataset.
    """
    import json
    from fastneg.moco import build_backbone
    root = Path(data_root)
    key = hashlib.sha256(json.dumps([dataset_digest(root), arch, size, cifar_stem, seed,
                                     list(scramble_range), sorted(kwargs.items())]
                                    ).encode()).hexdigest()[:16]
    cache = Path(cache_dir or root / ".fastneg-untrained") / f"{arch}-{size}px-{key}.json"
    if cache.exists():
        try:
            return json.loads(cache.read_text())
        except ValueError:
            pass   # a damaged cache file is recomputed
    log(f"untrained {arch} at {size} px (reference, computed once; cached in {cache})")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch, cifar_stem)
    torch.random.set_rng_state(gen_state)
    result = evaluate_backbone(backbone.to(device), root, size=size, corruptions=(),
                               scramble_range=scramble_range, device=device, log=log, **kwargs)
    result = {k: v for k, v in result.items() if k != "data"}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps(result, default=str))
    except OSError as e:   # a read-only dataset: the reference is just not cached
        log(f"  (could not cache the untrained reference: {e})")
    return result
