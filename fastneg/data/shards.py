"""Datasets stored as tar shards in the WebDataset layout, and `fastneg convert --to wds`.

Layout (what the loaders read, and what `fastneg convert --to wds` writes):

    OUT/train-0000.tar     samples, each a run of consecutive tar members sharing a key:
                           KEY.jpg (the image file as it was, JPEG; KEY.png for a PNG)
                           KEY.cls (the class index as ASCII digits)
    OUT/train-0000.idx     DALI's index of the shard (the format of DALI's `wds2idx` tool, v1.2:
                           a line "v1.2 SAMPLES", then one line per sample listing, per
                           component, its extension, data offset, size and member name), so
                           DALI's own fn.readers.webdataset can read the shards too
    OUT/shards.json        the manifest: layout, version, classes, samples per shard, the source
                           ImageFolder's fingerprint and the files left out (--skip-bad)

The converter names a sample by its ImageFolder dataset index (KEY = 9 digits), so a loader
pairs it with its texture and its crop windows exactly as it would read the folder. Shards hold
about --shard-size bytes each; samples are spread over them in an order drawn from fastneg's
counter RNG (seed, stream STREAM_SHUFFLE), so each shard holds a mix of classes.

Where shards can come from (`resolve_shards`): a local folder of *.tar; one path or URL; a
brace pattern (`train-{0000..0146}.tar`, each {A..B} a zero-padded range); and for URLs,
`pipe:CMD` (CMD's standard output is the tar, as in WebDataset: `pipe:curl -s URL`),
http(s):// (Python's urllib) or any other scheme through fsspec when it is installed.
Samples per shard, which every rank needs to plan equal steps, come from the manifest when
there is one, else from each shard's DALI index (beside a local shard; for a URL the same URL
with .idx for .tar), else from one pass over the shard's tar headers. Foreign shards (not
written by fastneg) are numbered by position: dataset index = samples of the shards before it
(in the listed order) + position in its shard.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastneg.fs import check_writable, swap_in, temporary_sibling
from fastneg.kernels import rng

log = logging.getLogger("fastneg.data")

LAYOUT = "fastneg-wds"
LAYOUT_VERSION = 1
MANIFEST = "shards.json"
PLAN = ".plan.json"           # in the staging folder of a conversion under way (resume)
IDX_VERSION = "v1.2"          # DALI's wds2idx index format
IMAGE_EXTS = ("jpg", "jpeg", "png")
LABEL_EXT = "cls"
KEY_DIGITS = 9
DEFAULT_SHARD_SIZE = "1GB"
# Counter-RNG slots of the shard streams (stream STREAM_SHUFFLE; slot 0 is the ImageFolder order)
SLOT_SHARD_ORDER = rng.slot(rng.STREAM_SHUFFLE, 1)   # loaders: the shards' order in an epoch
SLOT_BUFFER = rng.slot(rng.STREAM_SHUFFLE, 2)        # loaders: the shuffle buffer's picks
SLOT_CONVERT = rng.slot(rng.STREAM_SHUFFLE, 3)       # convert: which shard a sample goes to
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class ShardError(ValueError):
    """A shard or a sample of it cannot be read; the message names the shard (and key)."""


# ----------------------------------------------------------------- names and sources

def parse_size(text: str) -> int:
    """"1GB" / "500MB" / "64KiB" / "1000000" -> bytes (ValueError naming --shard-size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"--shard-size must be a size such as 1GB, 500MB or 64KiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def expand_braces(pattern: str) -> list[str]:
    """Every name of a brace pattern: each {A..B} is the range A..B, zero-padded to A's width."""
    parts = _BRACE.split(pattern)
    if len(parts) == 1:
        return [pattern]
    ranges = []
    for a, b in zip(parts[1::3], parts[2::3]):
        if int(b) < int(a):
            raise ValueError(f"shard pattern {pattern!r}: range {{{a}..{b}}} runs backwards")
        ranges.append([str(k).zfill(len(a)) for k in range(int(a), int(b) + 1)])
    names = []
    for combo in itertools.product(*ranges):
        name = parts[0]
        for k, value in enumerate(combo):
            name += value + parts[3 * k + 3]
        names.append(name)
    return names


def counter_keys(seed: int, step: int, samples, slot: int) -> np.ndarray:
    """uint32 draws of fastneg's counter RNG (fastneg.kernels.rng.mix) for an array of sample
    counters at once."""
    with np.errstate(over="ignore"):
        return rng._mix(seed, step, np.asarray(samples, np.uint64), slot).astype(np.uint32)


def is_url(name: str) -> bool:
    return name.startswith("pipe:") or "://" in name


def looks_like_shards(data) -> bool:
    """Whether `data` names tar shards (a pattern, a URL, a .tar, a folder with a manifest, or
    a folder of *.tar without sub-folders) rather than an ImageFolder or a .beton."""
    name = str(data)
    if is_url(name) or _BRACE.search(name) or name.endswith(".tar"):
        return True
    folder = Path(name)
    if not folder.is_dir():
        return False
    if (folder / MANIFEST).is_file():
        return True
    # *.tar and no sub-folder: an ImageFolder (or a dataset ROOT with train/) holding a stray
    # archive, such as ImageNet's download, stays a folder
    entries = list(os.scandir(folder))
    return any(e.name.endswith(".tar") and e.is_file() for e in entries) and \
        not any(e.is_dir() and not e.name.startswith(".") for e in entries)


@contextmanager
def open_shard(name: str):
    """A readable binary stream of shard `name` (path or URL, see the module docstring); a
    `pipe:` command that exits with an error raises ShardError when the stream is closed."""
    if name.startswith("pipe:"):
        proc = subprocess.Popen(name[5:], shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=1 << 20)
        failure = None
        try:
            yield proc.stdout
        except ShardError as e:     # a failed command's cut output: its status says more
            failure = e
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            status = proc.wait()
        if status != 0:
            raise ShardError(f"shard {name}: the command exited with status {status}"
                             + (f" ({err.splitlines()[-1]})" if err else ""))
        if failure is not None:
            raise failure
        return
    if name.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        try:
            stream = urllib.request.urlopen(name, timeout=60)   # noqa: S310 - the user's URL
        except (urllib.error.URLError, OSError) as e:
            raise ShardError(f"shard {name} cannot be fetched ({e})") from None
        with stream:
            yield stream
        return
    if "://" in name:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"reading {name} needs fsspec (and the package of its scheme, e.g. "
                             "s3fs): pip install fsspec; or give a pipe:CMD URL") from None
        try:
            stream = fsspec.open(name, "rb").open()
        except (OSError, ValueError) as e:
            raise ShardError(f"shard {name} cannot be opened ({e})") from None
        with stream:
            yield stream
        return
    try:
        stream = open(name, "rb")
    except OSError as e:
        raise ShardError(f"shard {name} cannot be read ({e.strerror or e})") from None
    with stream:
        yield stream


def index_name(shard: str) -> str:
    """Where the DALI index of `shard` lives: the same path or URL with .idx for its .tar."""
    head, dot, tail = shard.rpartition(".tar")
    return head + ".idx" + tail if dot else shard + ".idx"


def split_key(member: str) -> tuple[str, str]:
    """(key, extension) of a tar member, as WebDataset and DALI split it: the extension starts
    at the first dot of the file name."""
    slash = member.rfind("/") + 1
    dot = member.find(".", slash)
    return (member, "") if dot < 0 else (member[:dot], member[dot + 1:])


def _read_exactly(stream, size: int) -> bytes:
    """`size` bytes of `stream` (several reads where a pipe or socket returns fewer); fewer
    only at the end of the stream."""
    data = stream.read(size)
    if data is None:
        data = b""
    if len(data) == size or not data:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _tar_members(stream, name: str):
    """(member name, bytes) per regular file of a tar read sequentially.

    Reads the 512-byte headers itself (tarfile.TarInfo.frombuf parses them) instead of
    tarfile's stream mode, whose buffer copies make it several times slower than the disk;
    GNU long names and pax path records are followed, other member types skipped.
    """
    long_name = None
    while True:
        header = _read_exactly(stream, tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise ShardError(f"shard {name} ends inside a tar header (truncated tar)"
                             if header else f"shard {name} ends without the tar end marker "
                             "(truncated tar)")
        if header == tarfile.NUL * tarfile.BLOCKSIZE:
            return                                 # the end-of-archive marker
        member, size, kind = _parse_header(header, name)
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise ShardError(f"shard {name}: member {member} is cut short (truncated tar)")
        _read_exactly(stream, -size % tarfile.BLOCKSIZE)      # padding to a block
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            for record in data.split(b"\n"):
                _, _, field = record.partition(b" ")
                if field.startswith(b"path="):
                    long_name = field[5:].decode("utf-8", "surrogateescape")
        elif kind in tarfile.REGULAR_TYPES:
            yield (long_name or member), data
            long_name = None
        else:
            long_name = None


def _parse_header(header: bytes, name: str) -> tuple[str, int, bytes]:
    """(member name, data size, type flag) of a 512-byte ustar / GNU header, checksum checked
    (a few slices: tarfile.TarInfo.frombuf parses every field and costs more than the read)."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        field = header[124:136]
        size = tarfile.nti(field) if field[0] & 0x80 else \
            int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        stored, size = -1, 0
    if stored != sum(header) - sum(header[148:156]) + 8 * 32:
        raise ShardError(f"shard {name}: a damaged tar header (bad checksum)")
    member = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            member = prefix + b"/" + member
    return member.decode("utf-8", "surrogateescape"), size, header[156:157]


def iter_tar(stream, name: str):
    """(key, {extension: bytes}) per sample of the tar on `stream`, read in one pass (no
    seeks: works on pipes). A damaged or cut tar raises ShardError naming `name`."""
    key, parts = None, {}
    try:
        for member, data in _tar_members(stream, name):
            k, ext = split_key(member)
            if not k or k.endswith("/"):      # hidden files
                continue
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[ext] = data
    except OSError as e:
        raise ShardError(f"shard {name} cannot be read after {key or 'its start'} "
                         f"({e.strerror or e})") from None
    if key is not None:
        yield key, parts


def read_idx(text: str, name: str) -> int:
    """The sample count of a DALI index file's text."""
    first = text.split("\n", 1)[0].split()
    if len(first) != 2 or not first[0].startswith("v1") or not first[1].isdigit():
        raise ShardError(f"{name} is not a DALI webdataset index (first line {first!r})")
    return int(first[1])


# ----------------------------------------------------------------- the shard set

@dataclass(frozen=True)
class ShardSet:
    """The shards of a dataset, in order, with what the loaders need before reading any."""
    shards: tuple[str, ...]          # paths or URLs
    counts: np.ndarray               # int64 [S] samples per shard
    classes: tuple[str, ...]         # from the manifest; () for foreign shards
    keys_are_indices: bool           # keys are ImageFolder dataset indices (fastneg's shards)
    fingerprint: str | None          # the source ImageFolder's (fastneg's shards)
    description: str                 # what the user gave, for messages

    @property
    def offsets(self) -> np.ndarray:
        """int64 [S + 1]: dataset index of each shard's first sample when numbered by position."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def samples(self) -> int:
        return int(self.counts.sum())


def _manifest_near(shards: list[str]) -> dict | None:
    """The manifest beside local shards (same folder), or None."""
    if not shards or is_url(shards[0]):
        return None
    path = Path(shards[0]).parent / MANIFEST
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a shard manifest ({e})") from None
    if meta.get("layout") != LAYOUT or meta.get("version") != LAYOUT_VERSION:
        raise ValueError(f"{path}: layout {meta.get('layout')!r} version {meta.get('version')!r}, "
                         f"this fastneg reads {LAYOUT!r} version {LAYOUT_VERSION}; convert the "
                         "dataset again")
    return meta


def count_samples(shard: str) -> int:
    """Samples of one shard: from its DALI index if there is one, else one pass over the tar."""
    idx = index_name(shard)
    if not is_url(idx) and os.path.isfile(idx):
        return read_idx(Path(idx).read_text(), idx)
    if is_url(idx):
        try:
            with open_shard(idx) as stream:
                text = stream.read(4096).decode(errors="replace")
            return read_idx(text, idx)
        except ShardError:
            pass
    log.warning("%s: no DALI index beside it; counting its samples by reading it (write the "
                "index once with DALI's wds2idx or fastneg convert --to wds)", shard)
    with open_shard(shard) as stream:
        return sum(1 for _ in iter_tar(stream, shard))


def resolve_shards(data) -> ShardSet:
    """The ShardSet `data` names (see the module docstring). FileNotFoundError for a local shard
    or folder that is missing, ValueError for an empty set or a manifest that disagrees."""
    name = str(data)
    folder = Path(name)
    if not is_url(name) and folder.is_dir():
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"--data {name}: no *.tar shard in this folder")
    else:
        shards = expand_braces(name)
        missing = [s for s in shards if not is_url(s) and not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} not found ({len(missing)} of the "
                                    f"{len(shards)} shards of {name} are missing)")
    meta = _manifest_near(shards)
    if meta is not None:
        listed = {s["name"]: int(s["samples"]) for s in meta["shards"]}
        unknown = [s for s in shards if os.path.basename(s) not in listed]
        if unknown:
            raise ValueError(f"shard {unknown[0]} is not in the manifest "
                             f"{Path(shards[0]).parent / MANIFEST}: convert the dataset again")
        counts = [listed[os.path.basename(s)] for s in shards]
        classes, by_index, fingerprint = tuple(meta["classes"]), True, meta.get("fingerprint")
    else:
        counts = [count_samples(s) for s in shards]
        classes, by_index, fingerprint = (), False, None
    return ShardSet(tuple(shards), np.asarray(counts, np.int64), classes, by_index, fingerprint,
                    name)


# ----------------------------------------------------------------- the converter

def plan_shards(sizes: np.ndarray, order: np.ndarray, shard_bytes: int) -> list[np.ndarray]:
    """`order` (dataset indices) cut into consecutive runs of about equal bytes (`sizes` per
    index, plus the tar headers): ceil(total / shard_bytes) shards, each cut where the running
    total crosses a multiple of total / shards."""
    cost = sizes[order] + 1024 + 512          # the image, the .cls member, headers and padding
    total = int(cost.sum())
    count = max(1, min(len(order), -(-total // shard_bytes)))
    ends = np.cumsum(cost)
    cuts = np.searchsorted(ends, [total * k / count for k in range(1, count)], side="left") + 1
    return [part for part in np.split(order, cuts) if len(part)]


def _idx_line(components: list[tuple[str, int, int, str]]) -> str:
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def write_shard(path: Path, images, indices: np.ndarray, formats: dict[int, str]) -> None:
    """Write one shard and its DALI index, each atomically (temporary sibling, then rename)."""
    tmp, idx_tmp = temporary_sibling(path), temporary_sibling(path.with_suffix(".idx"))
    lines = []
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                format=tarfile.USTAR_FORMAT) as tar:
            for i in indices.tolist():
                key = f"{i:0{KEY_DIGITS}d}"
                data = Path(images.path(i)).read_bytes()
                label = str(int(images.labels[i])).encode()
                components = []
                for ext, payload in ((formats[i], data), (LABEL_EXT, label)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o444
                    start = tar.offset
                    tar.addfile(info, io.BytesIO(payload))
                    components.append((ext, start + tarfile.BLOCKSIZE, len(payload), info.name))
                lines.append(_idx_line(components))
        idx_tmp.write_text(f"{IDX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
        swap_in(tmp, path)
        swap_in(idx_tmp, path.with_suffix(".idx"))
    finally:
        tmp.unlink(missing_ok=True)
        idx_tmp.unlink(missing_ok=True)


def write_shards(src, out, *, shard_size: str | int = DEFAULT_SHARD_SIZE, prefix: str = "train",
                 seed: int = 0, skip_bad: bool = False, workers: int | None = None,
                 force: bool = False, progress: bool = True) -> dict:
    """`fastneg convert --to wds SRC OUT` (see the module docstring); returns the manifest.

    Checks first (the dataset index's pre-flight check, as every loader: unreadable files stop
    it, named, unless skip_bad leaves them out and lists them in the manifest). Staged: shards are
    written into a sibling folder `.OUT.partial` that becomes OUT when the manifest is written;
    resumable: run again with the same arguments after an interruption and the shards already
    written there are kept (the plan, stored with them, must match).
    """
    from fastneg.data.files import available_cpus, require_readable
    from fastneg.data.index import KIND_JPEG_RGB, load_index

    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    if shard_bytes < 1:
        raise ValueError(f"--shard-size must be positive, got {shard_size!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"--prefix must be letters, digits, - or _, got {prefix!r}")
    seed = rng.check_counter("--seed", seed)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    check_writable(out.parent)
    index = load_index(src, workers=workers or available_cpus(), progress=progress)
    check = index.file_check()
    require_readable(check, skip_bad)
    good = check.good
    order = good[np.argsort(counter_keys(seed, 0, good, SLOT_CONVERT), kind="stable")]
    parts = plan_shards(np.asarray(index.sizes, np.int64), order, shard_bytes)
    width = max(4, len(str(len(parts) - 1)))
    names = [f"{prefix}-{k:0{width}d}.tar" for k in range(len(parts))]
    plan = {"fingerprint": index.key, "shard_bytes": shard_bytes, "seed": seed, "prefix": prefix,
            "shards": [[n, int(p[0]), len(p)] for n, p in zip(names, parts)]}
    formats = {int(i): "jpg" if int(index.kinds[i]) == KIND_JPEG_RGB or _is_jpeg(check, i)
               else "png" for i in good.tolist()}

    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        try:
            kept = json.loads((stage / PLAN).read_text()) == plan
        except (OSError, ValueError):
            kept = False
        if not kept:
            shutil.rmtree(stage)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / PLAN).write_text(json.dumps(plan))
    bar = None
    if progress:
        from fastneg.progress import tqdm
        bar = tqdm(total=len(order), unit="img", desc=f"writing shards of {index.root}")
    resumed = 0
    for name, part in zip(names, parts):
        path = stage / name
        if not (path.is_file() and path.with_suffix(".idx").is_file()):
            write_shard(path, check.images, part, formats)
        else:
            resumed += 1
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    manifest = {"layout": LAYOUT, "version": LAYOUT_VERSION, "source": str(index.root.resolve()),
                "fingerprint": check.images.fingerprint(), "classes": list(check.images.classes),
                "samples": int(len(order)), "images": len(check.images), "keys": "index",
                "shard_bytes": shard_bytes, "seed": seed, "resumed_shards": resumed,
                "shards": [{"name": n, "samples": len(p)} for n, p in zip(names, parts)],
                "bad": [[i, check.images.files[i], why] for i, why in check.bad]}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (stage / PLAN).unlink()
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return manifest


def _is_jpeg(check, i: int) -> bool:
    """Whether readable file i holds JPEG content (CMYK JPEGs are not KIND_JPEG_RGB)."""
    with open(check.images.path(i), "rb") as f:
        return f.read(2) == b"\xff\xd8"


def run(args) -> None:
    t0 = time.perf_counter()
    info = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix,
                        seed=args.seed, skip_bad=args.skip_bad, workers=args.workers,
                        force=args.force)
    skipped = f", {len(info['bad'])} unreadable files left out" if info["bad"] else ""
    resumed = f" ({info['resumed_shards']} kept from an interrupted run)" \
        if info["resumed_shards"] else ""
    print(f"wrote {args.out}: {len(info['shards'])} shards{resumed}, {info['samples']} images, "
          f"{len(info['classes'])} classes{skipped} ({time.perf_counter() - t0:.1f} s)")
