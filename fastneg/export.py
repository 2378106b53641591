"""`fastneg export`: the query encoder's backbone of a trainer checkpoint as a plain state dict
that torchvision's and timm's ResNets load with strict key matching once their classifier is
dropped, and the reading of such files back (`load_backbone`, used by `fastneg eval`).

    fastneg export runs/x/checkpoint.pt --format torchvision --out resnet50.safetensors
        model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
        model.load_state_dict(safetensors.torch.load_file("resnet50.safetensors"))
        model = timm.create_model("resnet50", pretrained=False, num_classes=0)
        model.load_state_dict(safetensors.torch.load_file("resnet50.safetensors"))

Key names: torchvision's ResNet names (conv1, bn1, layer1.0.conv1, ..., layer4.*.downsample.1),
which timm's ResNet shares for resnet18..152, resnext50_32x4d and wide_resnet50_2; fc is not
written (both targets use an identity there), BatchNorm's num_batches_tracked is (both expect
it). The file format follows the suffix of --out: .safetensors (metadata in its header) or
.pt/.pth (a torch.save'd state dict, readable with weights_only=True; the metadata rides as an
attribute `fastneg_export` of the saved OrderedDict, which plain load_state_dict ignores).
Metadata: arch, cifar_stem, size, patch_range, features, content, format, source checkpoint
name and sha256, its step, and the fastneg version.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from fastneg.fs import atomic_file
from fastneg.moco import SMALL_ARCHS, TORCHVISION_ARCHS, build_backbone, load_encoder, \
    read_checkpoint

FORMATS = ("torchvision", "timm")
FILE_KINDS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
META_ATTR = "fastneg_export"   # attribute of a saved .pt state dict that holds its metadata


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fastneg")
    except PackageNotFoundError:
        return "unknown"


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_kind(path: Path, flag: str) -> str:
    """'safetensors' or 'torch' from the suffix of an output file; ValueError naming `flag`
    for another suffix or for .safetensors without the package."""
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{flag} {path}: the name must end in "
                         f"{', '.join(FILE_KINDS)} (the suffix picks the file format)")
    if kind == "safetensors":
        try:
            import safetensors.torch  # noqa: F401
        except ImportError:
            raise ValueError(f"{flag} {path}: writing .safetensors needs the safetensors "
                             "package (pip install safetensors); or name the file .pt") from None
    return kind


def save_state_dict(state: dict, path, metadata: dict[str, str]) -> None:
    """Write `state` (name -> tensor) to `path` atomically, as safetensors or torch by suffix,
    with `metadata` (str -> str) in the safetensors header or on the saved OrderedDict."""
    save_state_dicts([(state, Path(path), metadata)])


def save_state_dicts(files) -> None:
    """save_state_dict for several (state, path, metadata): all are written to temporary
    siblings first and renamed into place only when every one is complete."""
    with ExitStack() as stack:
        for state, path, metadata in files:
            kind = _file_kind(Path(path), "output")
            tmp = stack.enter_context(atomic_file(path))
            try:
                _write_file(state, tmp, kind, metadata)
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                raise PermissionError(f"cannot write {path} ({e.strerror or e})") from None
            except (OSError, RuntimeError) as e:   # torch's zip writer: RuntimeError on ENOSPC
                raise ValueError(f"cannot write {path} ({getattr(e, 'strerror', None) or e})") \
                    from None


def _write_file(state: dict, tmp: Path, kind: str, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if kind == "safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(tmp), metadata=dict(metadata))
        return
    od = OrderedDict(tensors)
    if hasattr(state, "_metadata"):
        od._metadata = state._metadata   # torch's per-module versions (BatchNorm's)
    setattr(od, META_ATTR, dict(metadata))
    torch.save(od, tmp)


def _check_target(arch: str, fmt: str, path) -> None:
    """ValueError unless `fmt`'s library has a model for `arch`."""
    if arch in SMALL_ARCHS:
        raise ValueError(f"checkpoint {path}: arch {arch} is fastneg's narrow CPU ResNet, which "
                         f"{fmt} has no model for; export works for "
                         f"{', '.join(TORCHVISION_ARCHS)}")
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"checkpoint {path}: unknown arch {arch!r}")


def export_checkpoint(checkpoint, out, *, fmt: str = "torchvision", head=None) -> dict:
    """Write the backbone of a trainer checkpoint's query encoder to `out` (and its MLP head to
    `head` when given); returns the backbone file's metadata.

    Every check (the checkpoint is a fastneg trainer checkpoint whose weights fit its arch, the
    arch has a torchvision/timm model, the output names) runs before anything is written; each
    file is written atomically. Raises FileNotFoundError / ValueError naming the problem.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _file_kind(out, "--out")
    head = Path(head) if head is not None else None
    if head is not None:
        _file_kind(head, "--head")
    outputs = [p for p in (out, head) if p is not None]
    if checkpoint.exists() and any(p.exists() and p.samefile(checkpoint) for p in outputs):
        raise ValueError(f"--out/--head would overwrite the checkpoint {checkpoint}")
    if head is not None and os.path.abspath(head) == os.path.abspath(out):
        raise ValueError(f"--head {head} is the same file as --out")
    ckpt = read_checkpoint(checkpoint)   # FileNotFoundError / ValueError naming the file
    args = ckpt["args"]
    _check_target(args["arch"], fmt, checkpoint)
    backbone, _ = load_encoder(checkpoint)   # the weights must fit the arch (ValueError)
    prefix = "encoder_q.head."
    head_state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if head is not None and not head_state:
        raise ValueError(f"checkpoint {checkpoint} has no projection head weights ({prefix}*)")
    features = _features(backbone)
    meta = {"content": "backbone", "format": fmt, "arch": args["arch"],
            "cifar_stem": json.dumps(bool(args.get("cifar_stem", False))),
            "size": str(args["size"]), "patch_range": json.dumps(args.get("patch_range")),
            "features": str(features), "source_checkpoint": checkpoint.name,
            "source_sha256": sha256_of(checkpoint), "source_step": str(ckpt.get("step", "")),
            "fastneg_version": _version()}
    files = []
    if head is not None:
        shapes = [tuple(v.shape) for k, v in sorted(head_state.items()) if k.endswith("weight")]
        files.append((head_state, head, {
            **meta, "content": "head", "layers": "Linear(features, hidden), ReLU, "
            "Linear(hidden, dim)", "hidden": str(shapes[0][0]), "dim": str(shapes[-1][0])}))
    files.append((backbone.state_dict(), out, meta))
    for p in outputs:
        p.parent.mkdir(parents=True, exist_ok=True)
    save_state_dicts(files)   # both files or neither
    return meta


def _features(backbone: nn.Module) -> int:
    """Width of a ResNet backbone's output: the channels of layer4's last BatchNorm (the last
    block's, which has no downsample branch)."""
    return [m for m in backbone.layer4.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


# ---------------------------------------------------------------- reading exported files

def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian size of a JSON header."""
    with open(path, "rb") as fh:
        start = fh.read(9)
    if len(start) < 9:
        return False
    n = int.from_bytes(start[:8], "little")
    return start[8:9] == b"{" and 8 + n <= path.stat().st_size


def read_exported(path) -> tuple[dict, dict]:
    """(state dict, metadata) of a backbone file: safetensors, or a torch.save'd dict of
    tensors (metadata {} when it has none). ValueError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {path} does not exist")
    if _is_safetensors(path):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ValueError(f"{path} is a safetensors file; reading it needs the safetensors "
                             "package") from None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:  # noqa: BLE001 - a damaged file can fail the reader in any way
            raise ValueError(f"{path} is a damaged safetensors file ({e})") from None
        return state, meta
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a safetensors file nor a torch file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refuses anything but tensors and plain containers
        raise ValueError(f"{path} is not a readable weights-only torch file "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict (a dict of tensors) nor a fastneg "
                         "trainer checkpoint")
    return obj, dict(getattr(obj, META_ATTR, None) or {})


def _is_trainer_checkpoint(path: Path) -> bool:
    """Whether `path` is a torch file holding a dict with 'model' and 'args' (what train/moco.py
    writes); read lazily (mmap) so that a big checkpoint is not loaded twice."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read_checkpoint gives the precise error
        return True
    return isinstance(obj, dict) and {"model", "args"} <= obj.keys()


def load_backbone(path, *, device="cpu", arch: str | None = None,
                  size: int | None = None) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on `device`, args) from a trainer checkpoint or an exported
    backbone file (`fastneg export`, or any ResNet state dict of a known arch: an `fc.*`
    classifier in it is dropped).

    args holds arch, size, cifar_stem and patch_range. For an exported file they come from
    its metadata; `arch` and `size` fill in what it lacks (a file without metadata needs
    both) and must agree with what it has. The CIFAR stem of a file without metadata is read
    from the shape of conv1. For a trainer checkpoint `arch` and `size`, when given, must
    match the checkpoint's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _is_trainer_checkpoint(path):
        backbone, args = load_encoder(path, device=device)
        for flag, given, own in (("--arch", arch, args["arch"]), ("--size", size, args["size"])):
            if given is not None and given != own:
                raise ValueError(f"{flag} {given} disagrees with checkpoint {path} ({own})")
        return backbone, args
    state, meta = read_exported(path)
    if meta.get("content", "backbone") != "backbone":
        raise ValueError(f"{path} holds a {meta['content']}, not a backbone")
    args = {}
    for flag, key, given, cast in (("--arch", "arch", arch, str), ("--size", "size", size, int)):
        own = cast(meta[key]) if meta.get(key) else None
        if given is not None and own is not None and given != own:
            raise ValueError(f"{flag} {given} disagrees with {path}'s metadata ({own})")
        value = given if given is not None else own
        if value is None:
            raise ValueError(f"{path} does not record its {key}; give {flag}")
        args[key] = value
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "cifar_stem" in meta:
        cifar_stem = bool(json.loads(meta["cifar_stem"]))
    else:
        conv1 = state.get("conv1.weight")
        cifar_stem = conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3
    args["cifar_stem"] = cifar_stem
    args["patch_range"] = json.loads(meta["patch_range"]) if meta.get("patch_range") else None
    backbone, _ = build_backbone(args["arch"], cifar_stem)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: weights do not fit arch {args['arch']!r} "
                         f"({' '.join(s.strip() for s in first[:3])[:300]})") from None
    return backbone.to(device).eval(), args


# ---------------------------------------------------------------- the verb

def register(sub) -> None:
    e = sub.add_parser(
        "export", help="write a checkpoint's backbone for torchvision or timm",
        description="Write the query encoder's backbone of a trainer checkpoint as a plain "
                    "state dict that torchvision.models.<arch>() and timm.create_model(<arch>, "
                    "num_classes=0) load with strict=True once the classifier is an identity "
                    "(model.fc = torch.nn.Identity() for torchvision). The suffix of --out "
                    "picks the file format: .safetensors (with metadata: arch, size, source "
                    "sha256, fastneg version) or .pt/.pth (torch.save, weights only). "
                    "`fastneg eval` reads the file back.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="trainer checkpoint (RUN_DIR/*.pt)")
    e.add_argument("--format", choices=FORMATS, required=True,
                   help="the library that will load the weights (both use the same key names; "
                        "the choice is recorded and the arch checked against it)")
    e.add_argument("--out", required=True,
                   help="backbone file: NAME.safetensors, NAME.pt or NAME.pth")
    e.add_argument("--head", metavar="FILE",
                   help="also write the projection head (Linear, ReLU, Linear; keys 0.* and "
                        "2.*) to FILE, in the format its suffix names")
    e.set_defaults(func=run)


def run(args) -> None:
    meta = export_checkpoint(args.checkpoint, args.out, fmt=args.format, head=args.head)
    stem = ("; set model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = "
            "nn.Identity() before loading (CIFAR stem)" if meta["cifar_stem"] == "true" else "")
    print(f"wrote {args.out}: {meta['arch']} backbone ({meta['features']} features, "
          f"{args.format}){f' and head {args.head}' if args.head else ''}{stem}")
