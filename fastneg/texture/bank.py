"""The texture bank: one synthesized texture per training image, built once, loaded to the device.

Layout of a bank folder (`storage` in index.json; BankSpec.storage, `--format`):

    jpeg (default): textures.jpg   the rows' JPEG files (quality BankSpec.quality), end to end
                    spans.i8       int64 [rows, 2]: (byte offset, length) of row r in textures.jpg
    raw:            textures.u8    raw uint8 [rows, size, size, 3] (numpy.memmap-able; C order)
    rows.npy      int64 [images]: texture row of each dataset image (dataset index order)
    sources.npy   int64 [rows]: dataset image each texture row was made from
    index.json    format, version, source root, dataset fingerprint, counts, synthesis
                  parameters, and `complete`
    done.u8       while building only: one byte per row, 1 once that row is durably written

Rows follow the dataset index order of fastneg.data.imagefolder (the loaders' order), so for a
full bank texture row i belongs to image i and Batch.indices select textures directly.

Smaller banks (`limit`): the rows are a class-stratified subset. Class c with n_c images gets
m_c rows: one each, and the other limit - classes rows split in proportion to n_c - 1 (largest
remainder, ties to the lower class), so balanced classes get equal shares. Its rows are made
from its images at within-class positions ceil(j * n_c / m_c), j < m_c. Image p of class c (the
p-th of its class) uses row j = floor(p * m_c / n_c): always a texture of its own class, its own
texture when it was chosen, and the class's images share its textures in equal consecutive runs.
`rows.npy` holds this map; TextureBank.rows_for applies it.

Crash safety: textures are written chunk by chunk with pwrite + fdatasync (jpeg: appended to
textures.jpg, then their spans written and synced), and only then are their rows marked in
done.u8 (also synced); `--resume` recomputes exactly the rows not marked (jpeg: after cutting
textures.jpg back to the end of the last span marked done).

write_bank_from_arrays writes a complete jpeg bank from textures given as arrays (benchmarks,
tests: the format without the synthesis).

The loaders read a jpeg bank like images (BankReader: one pread per texture, no whole-bank load,
so host memory does not grow with the bank); TextureBank.load puts a whole bank (either storage)
on a device, for small banks.
`complete` becomes true by an atomic rename of index.json after the last sync, so a bank that
was interrupted is never taken for a complete one. Texture i depends only on (seed, i), so a
resumed or parallel build writes the same bytes as a serial one.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from fastneg.progress import tqdm

from fastneg.data.files import available_cpus, inspect_file
from fastneg.data.imagefolder import ImageList, scan_image_folder
from fastneg.fs import hold_lock, write_bytes_atomic
from fastneg.texture import synthesis

log = logging.getLogger("fastneg.texture")

FORMAT = "fastneg-texture-bank"
VERSION = 1
TEXTURES_FILE, INDEX_FILE, DONE_FILE = "textures.u8", "index.json", "done.u8"
ROWS_FILE, SOURCES_FILE, LOCK_FILE = "rows.npy", "sources.npy", ".lock"
JPEG_FILE, SPANS_FILE = "textures.jpg", "spans.i8"
BANK_FILES = (TEXTURES_FILE, INDEX_FILE, DONE_FILE, ROWS_FILE, SOURCES_FILE, LOCK_FILE,
              JPEG_FILE, SPANS_FILE)
STORAGES = ("jpeg", "raw")


@dataclass(frozen=True)
class BankSpec:
    """What a bank is made of; stored in index.json, and a resumed build must match it."""
    size: int = synthesis.PAPER_SIZE
    exemplar: int = synthesis.PAPER_EXEMPLAR
    block: int | None = None       # None: synthesis.default_block(exemplar)
    overlap: int | None = None
    tol: float = 0.1
    seed: int = 0
    limit: int | None = None       # None: one texture per image
    storage: str = "jpeg"          # "jpeg" or "raw" (module docstring)
    quality: int = 90              # JPEG quality of storage "jpeg"

    def resolved(self) -> BankSpec:
        """The spec with block/overlap filled in and every value checked."""
        block, overlap = synthesis.default_block(self.exemplar)
        spec = BankSpec(self.size, self.exemplar, block if self.block is None else self.block,
                        overlap if self.overlap is None else self.overlap, self.tol, self.seed,
                        self.limit, self.storage, self.quality)
        if spec.size < 1:
            raise ValueError(f"--size must be >= 1, got {spec.size}")
        if spec.exemplar < 2:
            raise ValueError(f"--exemplar must be >= 2, got {spec.exemplar}")
        if not 1 <= spec.overlap < spec.block <= spec.exemplar:
            raise ValueError(f"need 1 <= overlap < block <= exemplar, got overlap {spec.overlap},"
                             f" block {spec.block}, exemplar {spec.exemplar}")
        if spec.tol < 0:
            raise ValueError(f"tol must be >= 0, got {spec.tol}")
        if spec.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {spec.seed}")
        if spec.limit is not None and spec.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {spec.limit}")
        if spec.storage not in STORAGES:
            raise ValueError(f"--format must be one of {', '.join(STORAGES)}, "
                             f"got {spec.storage!r}")
        if not 1 <= spec.quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {spec.quality}")
        return spec


@dataclass(frozen=True)
class BuildReport:
    path: Path
    rows: int
    built: int             # textures made by this call (the rest were already done)
    seconds: float         # wall time of this call's synthesis
    cpu_seconds: float     # synthesis CPU time summed over workers (decode included)
    workers: int

    def summary(self) -> str:
        if not self.built:
            return f"{self.path}: complete, {self.rows} textures, nothing to do"
        return (f"{self.path}: {self.built} textures in {self.seconds:.1f} s = "
                f"{self.built / self.seconds:.1f} textures/s on {self.workers} worker(s); "
                f"{1000 * self.cpu_seconds / self.built:.1f} ms per texture per core "
                f"({self.built / max(self.cpu_seconds, 1e-9):.1f} textures/s per core)")


# ---------------------------------------------------------------- rows of a smaller bank

def select_rows(labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(sources [rows], image_rows [images]) for a bank of `limit` rows (rule: module docstring)."""
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if limit is None or limit >= n:
        ident = np.arange(n, dtype=np.int64)
        return ident, ident.copy()
    classes, counts = np.unique(labels, return_counts=True)
    if limit < len(classes):
        raise ValueError(f"--limit {limit} is below the number of classes ({len(classes)}): "
                         "a smaller bank keeps at least one texture per class")
    # Largest remainder over the images beyond each class's first, which every class gets.
    extra = limit - len(classes)
    share = extra * (counts - 1) / max(1, n - len(classes))
    per_class = 1 + np.floor(share).astype(np.int64)
    order = np.lexsort((classes, -(share - np.floor(share))))   # largest remainder first
    for c in order[:limit - per_class.sum()]:
        per_class[c] += 1
    sources = np.empty(limit, np.int64)
    image_rows = np.empty(n, np.int64)
    row0 = 0
    for c, n_c, m_c in zip(classes, counts, per_class):
        members = np.flatnonzero(labels == c)
        j = np.arange(m_c)
        sources[row0:row0 + m_c] = members[-(-j * n_c // m_c)]          # ceil(j * n_c / m_c)
        image_rows[members] = row0 + np.arange(n_c) * m_c // n_c
        row0 += m_c
    return sources, image_rows


# ---------------------------------------------------------------- files

def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes_atomic(path, buf.getvalue())


def read_index(path) -> dict:
    """index.json of the bank folder `path`, checked to be a fastneg bank of a known version."""
    path = Path(path)
    index = path / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: {path} is not a texture bank "
                                "(make one with: fastneg build-bank DATA --out BANK)")
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index} is not a {FORMAT} index (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{index} has version {meta.get('version')}; this fastneg reads "
                         f"version {VERSION}: rebuild the bank")
    for key, kind in INDEX_KEYS.items():
        if key not in meta:
            raise ValueError(f"{index} lacks the key {key!r}: the bank is damaged; rebuild it "
                             "with --force")
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise ValueError(f"{index}: {key!r} is {meta[key]!r}, not a {kind.__name__}: the "
                             "bank is damaged; rebuild it with --force")
    return meta


# keys of index.json that loading and resuming rely on, with their types
INDEX_KEYS = {"complete": bool, "rows": int, "images": int, "size": int, "fingerprint": str,
              "source_root": str}


def _open_sized(path: Path, nbytes: int) -> int:
    """A read-write fd on `path`, created and sized to nbytes (new bytes read as zeros)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size != nbytes:
        os.ftruncate(fd, nbytes)
    return fd


# ---------------------------------------------------------------- workers

def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: the kernel kills this worker when the builder process dies
    (Linux prctl PR_SET_PDEATHSIG), so a killed build leaves no workers behind."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):                    # not Linux: the check below only
        pass
    if os.getppid() != parent:     # the builder died before the prctl took effect
        os._exit(1)


def _load_rgb(path: Path) -> np.ndarray:
    problem = inspect_file(path)[0]   # no FIFO read, no decompression bomb
    if problem is not None:
        raise ValueError(f"cannot read image {path}: {problem}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _make_chunk(job):
    """Synthesize the textures of one chunk -> (rows, uint8 [n, size, size, 3], CPU seconds).

    CPU time, not wall time, measures the per-core rate: other load on the machine then does not
    count (synthesis is single-threaded).
    """
    spec, rows, sources, paths = job
    t0 = time.process_time()
    out = np.empty((len(rows), spec.size, spec.size, 3), np.uint8)
    for n, (sample, path) in enumerate(zip(sources, paths)):
        out[n] = synthesis.synthesize(_load_rgb(path), spec.size, exemplar=spec.exemplar,
                                      block=spec.block, overlap=spec.overlap, tol=spec.tol,
                                      seed=spec.seed, sample=int(sample))
    if spec.storage == "jpeg":
        out = [encode_jpeg(t, spec.quality) for t in out]
    return rows, out, time.process_time() - t0


def encode_jpeg(texture: np.ndarray, quality: int) -> bytes:
    """The JPEG file of one uint8 [size, size, 3] texture (4:4:4, no chroma subsampling: a
    texture is all fine detail)."""
    import io
    buf = io.BytesIO()
    Image.fromarray(texture).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _results(jobs, pool, workers):
    """Yield _make_chunk results, computed here (pool None) or by the pool in any order."""
    if pool is None:
        for job in jobs:
            yield _make_chunk(job)
        return
    pending = set()
    try:
        for job in jobs:
            pending.add(pool.submit(_make_chunk, job))
            # A bounded window of chunks in flight keeps memory flat on any dataset size.
            if len(pending) >= 2 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        for f in as_completed(pending):
            yield f.result()
    finally:
        pool.shutdown(cancel_futures=True)   # on an error or interrupt: drop queued chunks


class _Progress(tqdm):
    """tqdm without its monitor thread: the pool forks workers later, and fork + threads can
    deadlock."""
    monitor_interval = 0


def _warm_up() -> None:
    """Compile (or load) the Numba kernels once, before pool workers fork from this process."""
    synthesis.quilt([np.zeros((6, 6, 3), np.uint8)], 8, block=4, overlap=1)


# ---------------------------------------------------------------- storage writers

def _runs(r: np.ndarray) -> list[np.ndarray]:
    """Positions in the sorted rows `r` of each run of consecutive rows (resume leaves gaps)."""
    return np.split(np.arange(len(r)), np.flatnonzero(np.diff(r) != 1) + 1)


class _RawWriter:
    """textures.u8: row r at byte r * size * size * 3."""

    def __init__(self, out: Path, spec: BankSpec, rows: int, done: np.ndarray):
        self.row_bytes = spec.size * spec.size * 3
        self.fd = _open_sized(out / TEXTURES_FILE, rows * self.row_bytes)

    def write(self, r: np.ndarray, tex: np.ndarray) -> None:
        for run in _runs(r):
            os.pwrite(self.fd, tex[run].tobytes(), int(r[run[0]]) * self.row_bytes)
        os.fdatasync(self.fd)

    def finish(self) -> None:
        os.fsync(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


class _JpegWriter:
    """textures.jpg (JPEG files appended in the order chunks finish) + spans.i8 (where each is).

    On resume the file is cut back to the end of the last span whose row is marked done: bytes
    after it belong to a chunk that was never marked, and are written again.
    """

    def __init__(self, out: Path, spec: BankSpec, rows: int, done: np.ndarray):
        self.spans_fd = _open_sized(out / SPANS_FILE, rows * 16)
        spans = np.frombuffer(os.pread(self.spans_fd, rows * 16, 0), np.int64).reshape(rows, 2)
        kept = spans[done == 1]
        self.end = int((kept[:, 0] + kept[:, 1]).max()) if len(kept) else 0
        self.fd = os.open(out / JPEG_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, self.end)

    def write(self, r: np.ndarray, tex: list[bytes]) -> None:
        spans = np.empty((len(r), 2), np.int64)
        blob = b"".join(tex)
        os.pwrite(self.fd, blob, self.end)
        for k, t in enumerate(tex):
            spans[k] = self.end, len(t)
            self.end += len(t)
        os.fdatasync(self.fd)
        for run in _runs(r):
            os.pwrite(self.spans_fd, spans[run].tobytes(), int(r[run[0]]) * 16)
        os.fdatasync(self.spans_fd)

    def finish(self) -> None:
        os.fsync(self.fd)
        os.fsync(self.spans_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        os.close(self.spans_fd)


# ---------------------------------------------------------------- build

def _check_out(out: Path, meta: dict, resume: bool, force: bool) -> None:
    """Refuse an `out` that this build must not write to (read-only checks)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"bank path {out} exists and is not a folder")
    if force or not out.is_dir():
        return
    if (out / INDEX_FILE).exists():
        old = read_index(out)
        if not resume:
            state = "complete" if old["complete"] else "incomplete"
            raise FileExistsError(f"texture bank {out} exists ({state}); pass --resume to "
                                  "continue it or --force to rebuild it")
        old = {**old, "storage": storage_of(old), "quality": old.get("quality", meta["quality"])}
        diff = [k for k in meta if k not in ("complete", "source_root") and old.get(k) != meta[k]]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in diff)
            raise ValueError(f"cannot resume {out}: it was built with other settings ({details}); "
                             "pass --force to rebuild it")
        return
    others = [p.name for p in out.iterdir() if p.name not in BANK_FILES]
    if others:
        raise FileExistsError(f"{out} holds files that are not a texture bank "
                              f"({', '.join(sorted(others)[:3])}); choose an empty folder")


def build_bank(data, out, spec: BankSpec = BankSpec(), *, workers: int | None = None,
               resume: bool = False, force: bool = False, chunk: int = 16,
               progress: bool = True, on_chunk=None) -> BuildReport:
    """Build (or, with resume, finish) the texture bank of the ImageFolder `data` in `out`.

    workers: processes (default: available cores; 1 runs in this process). on_chunk(done, rows)
    is called after each chunk is durably stored (an exception there stops the build, which
    --resume then finishes).
    """
    spec = spec.resolved()
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    images = scan_image_folder(data)
    sources, image_rows = select_rows(images.labels, spec.limit)
    rows = len(sources)
    meta = {"format": FORMAT, "version": VERSION, "source_root": str(images.root.resolve()),
            "fingerprint": images.fingerprint(), "images": len(images), "rows": rows,
            **asdict(spec), "algorithm": "image-quilting", "complete": False}
    out = Path(out)
    _check_out(out, meta, resume, force)
    out.mkdir(parents=True, exist_ok=True)
    # A lock held by a live build names its PID; one left by a killed build is taken over.
    lock = hold_lock(out / LOCK_FILE, f"texture bank {out} (being written)")
    try:
        if force:      # only once the lock says no other build is using these files
            for name in BANK_FILES:
                if name != LOCK_FILE:
                    (out / name).unlink(missing_ok=True)
        return _build_locked(images, out, spec, meta, sources, image_rows, workers, chunk,
                             progress, on_chunk)
    finally:
        lock.close()


def _build_locked(images: ImageList, out: Path, spec: BankSpec, meta: dict, sources, image_rows,
                  workers, chunk, progress, on_chunk) -> BuildReport:
    rows = len(sources)
    if (out / INDEX_FILE).exists() and read_index(out)["complete"]:
        return BuildReport(out, rows, 0, 0.0, 0.0, 0)
    write_bytes_atomic(out / INDEX_FILE, json.dumps(meta, indent=1).encode())
    _save_npy_atomic(out / ROWS_FILE, image_rows)
    _save_npy_atomic(out / SOURCES_FILE, sources)
    done_fd = _open_sized(out / DONE_FILE, rows)
    try:
        done = np.frombuffer(os.pread(done_fd, rows, 0), np.uint8).copy()
        store = (_JpegWriter if spec.storage == "jpeg" else _RawWriter)(out, spec, rows, done)
        todo = np.flatnonzero(done == 0)
        jobs = []
        for a in range(0, len(todo), chunk):
            r = todo[a:a + chunk]
            jobs.append((spec, r, sources[r], [images.path(int(i)) for i in sources[r]]))
        workers = max(1, min(workers or available_cpus(), len(jobs) or 1))
        if workers > 1:
            _warm_up()
        # fork: the workers inherit the compiled kernels (_warm_up); they die with this process.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent,
                                   initargs=(os.getpid(),)) if workers > 1 else None
        bar = _Progress(total=rows, initial=rows - len(todo), disable=not progress, unit="tex",
                   desc=f"build-bank {out.name}", smoothing=0.1)
        t0 = time.perf_counter()
        cpu = 0.0
        with store, pool or nullcontext(), bar:
            for r, tex, seconds in _results(jobs, pool, workers):
                cpu += seconds
                store.write(r, tex)            # durable before the rows count as done
                done[r] = 1
                for run in _runs(r):
                    os.pwrite(done_fd, done[r[run]].tobytes(), int(r[run[0]]))
                os.fdatasync(done_fd)
                bar.update(len(r))
                if on_chunk is not None:
                    on_chunk(int(done.sum()), rows)
            seconds = time.perf_counter() - t0
            store.finish()
    finally:
        os.close(done_fd)
    write_bytes_atomic(out / INDEX_FILE, json.dumps({**meta, "complete": True}, indent=1).encode())
    (out / DONE_FILE).unlink()
    return BuildReport(out, rows, len(todo), seconds, cpu, workers)


# ---------------------------------------------------------------- a bank of given textures

def write_bank_from_arrays(data, out, textures, *, quality: int = 90, algorithm: str = "given",
                           force: bool = False, chunk: int = 64) -> Path:
    """Write a complete JPEG bank in `out` for the ImageFolder `data` from `textures`, an iterable
    of uint8 [size, size, 3] arrays, one per image in dataset index order (texture i is image
    i's), instead of synthesizing them: the same files, index.json and checks as build_bank's
    (BankReader, TextureBank.load, the loaders and `fastneg convert --texture-bank` read it).

    For benchmarks and tests, where a bank of the right format and size matters and its content
    does not. `algorithm` is recorded in index.json (such a bank cannot be resumed by
    build_bank). Raises ValueError when the count or a shape is wrong (then the bank stays
    incomplete), FileExistsError for an existing bank without force.
    """
    images = scan_image_folder(data)
    n = len(images)
    it = iter(textures)
    try:
        first = np.asarray(next(it))
    except StopIteration:
        raise ValueError(f"no textures given for the {n} images of {images.root}") from None
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3 \
            or first.shape[0] != first.shape[1]:
        raise ValueError(f"textures must be uint8 [size, size, 3], got {first.dtype} "
                         f"{list(first.shape)}")
    size = first.shape[0]
    spec = BankSpec(size=size, quality=quality, storage="jpeg")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    ident = np.arange(n, dtype=np.int64)
    meta = {"format": FORMAT, "version": VERSION, "source_root": str(images.root.resolve()),
            "fingerprint": images.fingerprint(), "images": n, "rows": n, "size": size,
            "limit": None, "storage": "jpeg", "quality": quality, "algorithm": algorithm,
            "complete": False}
    out = Path(out)
    _check_out(out, meta, False, force)
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(out / LOCK_FILE, f"texture bank {out} (being written)")
    try:
        for name in BANK_FILES:
            if name != LOCK_FILE:
                (out / name).unlink(missing_ok=True)
        write_bytes_atomic(out / INDEX_FILE, json.dumps(meta, indent=1).encode())
        _save_npy_atomic(out / ROWS_FILE, ident)
        _save_npy_atomic(out / SOURCES_FILE, ident)
        written = 0
        with _JpegWriter(out, spec, n, np.zeros(n, np.uint8)) as store:
            pending = [first]
            for tex in it:
                pending.append(np.asarray(tex))
                if len(pending) == chunk:
                    written = _store_given(store, pending, written, n, size, quality)
                    pending = []
            written = _store_given(store, pending, written, n, size, quality)
            if written != n:
                raise ValueError(f"got {written} textures for the {n} images of {images.root}")
            store.finish()
        write_bytes_atomic(out / INDEX_FILE,
                           json.dumps({**meta, "complete": True}, indent=1).encode())
    finally:
        lock.close()
    return out


def _store_given(store: _JpegWriter, pending: list, written: int, n: int, size: int,
                 quality: int) -> int:
    """Encode and append the textures `pending` as rows written.., the new count."""
    if not pending:
        return written
    if written + len(pending) > n:
        raise ValueError(f"more textures than the {n} images of the dataset")
    for t in pending:
        if t.dtype != np.uint8 or t.shape != (size, size, 3):
            raise ValueError(f"texture {written}: expected uint8 [{size}, {size}, 3], got "
                             f"{t.dtype} {list(t.shape)}")
    store.write(np.arange(written, written + len(pending)),
                [encode_jpeg(t, quality) for t in pending])
    return written + len(pending)


# ---------------------------------------------------------------- preview

def write_preview(bank, png, *, count: int = 8, per_row: int = 4, cell: int = 112) -> Path:
    """A PNG grid of `count` source images, each beside its texture (rows spread over the bank)."""
    bank = Path(bank)
    meta = read_index(bank)
    if not meta["complete"]:
        raise ValueError(f"texture bank {bank} is incomplete: finish it with --resume first")
    if count < 1 or per_row < 1 or cell < 8:
        raise ValueError(f"preview needs count >= 1, per_row >= 1, cell >= 8 "
                         f"(got {count}, {per_row}, {cell})")
    size, rows = meta["size"], meta["rows"]
    reader = BankReader(bank)
    sources = np.load(bank / SOURCES_FILE)
    images = scan_image_folder(meta["source_root"])
    picks = np.linspace(0, rows - 1, min(count, rows)).round().astype(np.int64)
    per_row = min(per_row, len(picks))
    gap = cell // 8                                  # white space between (source, texture) pairs
    pair_w = 2 * cell + gap
    grid = Image.new("RGB", (pair_w * per_row - gap, (cell + gap) * math.ceil(len(picks) / per_row)
                             - gap), "white")
    for n, r in enumerate(picks):
        src = Image.open(images.path(int(sources[r]))).convert("RGB")
        scale = cell / max(src.size)
        src = src.resize((max(1, round(src.width * scale)), max(1, round(src.height * scale))),
                         Image.BICUBIC)
        x, y = pair_w * (n % per_row), (cell + gap) * (n // per_row)
        grid.paste(src, (x + (cell - src.width) // 2, y + (cell - src.height) // 2))
        grid.paste(Image.fromarray(reader.pixels(int(r))).resize((cell, cell), Image.BICUBIC),
                   (x + cell, y))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(png, optimize=True)
    return png


# ---------------------------------------------------------------- loading

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def storage_of(meta: dict) -> str:
    """The storage of a bank's index.json ("raw" for banks written before there was a choice)."""
    return meta.get("storage", "raw")


class BankReader:
    """Reads single textures of a complete bank from disk, for the loaders: nothing is loaded
    up front but rows.npy (memory-mapped), so host memory stays flat however large the bank.

    Picklable (open files are reopened lazily in each process). `encoded(row)` gives a jpeg
    bank's JPEG bytes (uint8 [n]), `pixels(row)` any bank's uint8 [size, size, 3].
    """

    def __init__(self, path, *, expect=None):
        path = Path(path)
        meta = read_index(path)
        if not meta["complete"]:
            raise ValueError(f"texture bank {path} is incomplete: finish it with fastneg "
                             f"build-bank {meta['source_root']} --out {path} --resume")
        if expect is not None:
            _check_expected(path, meta, expect)
        self.path, self.meta, self.storage = path, meta, storage_of(meta)
        self.rows, self.size = meta["rows"], meta["size"]
        name = JPEG_FILE if self.storage == "jpeg" else TEXTURES_FILE
        expected = None if self.storage == "jpeg" else self.rows * self.size * self.size * 3
        data = path / name
        if not data.exists() or (expected is not None and data.stat().st_size != expected):
            raise ValueError(f"{data} is missing or has the wrong size: the bank is damaged; "
                             "rebuild it with --force")
        if self.storage == "jpeg" and (path / SPANS_FILE).stat().st_size != self.rows * 16:
            raise ValueError(f"{path / SPANS_FILE} does not hold {self.rows} spans: the bank is "
                             "damaged; rebuild it with --force")
        self._fd = None
        self._spans = None
        self._image_rows = None

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_spans": None, "_image_rows": None}

    def _open(self):
        if self._fd is None:
            name = JPEG_FILE if self.storage == "jpeg" else TEXTURES_FILE
            self._fd = os.open(self.path / name, os.O_RDONLY)
            if self.storage == "jpeg":
                self._spans = np.memmap(self.path / SPANS_FILE, np.int64, mode="r",
                                        shape=(self.rows, 2))
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def rows_for(self, indices: np.ndarray) -> np.ndarray:
        """Texture rows of dataset `indices` (int64 numpy), from rows.npy."""
        if self._image_rows is None:
            self._image_rows = np.load(self.path / ROWS_FILE, mmap_mode="r")
        return np.asarray(self._image_rows[np.asarray(indices, np.int64)], np.int64)

    def encoded(self, row: int) -> np.ndarray:
        """uint8 [n]: the JPEG file of texture `row` (jpeg banks only)."""
        if self.storage != "jpeg":
            raise ValueError(f"texture bank {self.path} is stored raw, not as JPEG")
        fd = self._open()
        offset, length = (int(v) for v in self._spans[row])
        return np.frombuffer(os.pread(fd, length, offset), np.uint8)

    def pixels(self, row: int) -> np.ndarray:
        """uint8 [size, size, 3]: texture `row`, decoded (jpeg) or read (raw)."""
        if self.storage == "jpeg":
            import io
            with Image.open(io.BytesIO(self.encoded(row).tobytes())) as im:
                return np.asarray(im.convert("RGB"))
        nbytes = self.size * self.size * 3
        data = os.pread(self._open(), nbytes, row * nbytes)
        return np.frombuffer(data, np.uint8).reshape(self.size, self.size, 3)


class TextureBank:
    """A complete bank in memory: `.textures` uint8 [rows, size, size, 3] on the device.

    placement: "cuda" (device memory), "pinned" (page-locked host memory: the bank did not fit
    the GPU budget), "mmap" (CPU, a raw bank memory-mapped from the file: pages load on first
    use) or "memory" (CPU, a jpeg bank decoded whole).
    """

    def __init__(self, textures, image_rows, meta: dict, placement: str):
        self.textures = textures
        self.image_rows = image_rows      # int64 [images] tensor on the CPU
        self.meta = meta
        self.placement = placement
        self._rows_on = {}

    def __len__(self) -> int:
        return self.textures.shape[0]

    @property
    def size(self) -> int:
        return self.meta["size"]

    @classmethod
    def load(cls, path, device="cpu", *, expect=None, gpu_budget: float = 0.5) -> TextureBank:
        """Load a complete bank onto `device`.

        expect: the dataset the bank must belong to: an ImageList, a dataset folder, or a
        fingerprint (64 hex digits); a bank made from another listing raises ValueError.
        gpu_budget: on CUDA, the bank goes to device memory when it takes at most this fraction
        of the free memory (the rest is the model's); otherwise to pinned host memory.
        """
        import torch
        path = Path(path)
        meta = read_index(path)
        if not meta["complete"]:
            done = path / DONE_FILE
            got = int(np.fromfile(done, np.uint8).sum()) if done.exists() else 0
            raise ValueError(f"texture bank {path} is incomplete ({got} of {meta['rows']} "
                             "textures): finish it with fastneg build-bank "
                             f"{meta['source_root']} --out {path} --resume")
        if expect is not None:
            _check_expected(path, meta, expect)
        rows, size = meta["rows"], meta["size"]
        shape = (rows, size, size, 3)
        image_rows = torch.from_numpy(np.load(path / ROWS_FILE))
        if len(image_rows) != meta["images"]:
            raise ValueError(f"{path / ROWS_FILE} has {len(image_rows)} entries, index.json "
                             f"says {meta['images']} images: rebuild the bank with --force")
        if storage_of(meta) == "jpeg":
            # Decoded whole into host memory: for small banks (large ones go through the loaders).
            reader = BankReader(path)
            array = np.empty(shape, np.uint8)
            for r in range(rows):
                array[r] = reader.pixels(r)
        else:
            tex_path = path / TEXTURES_FILE
            if not tex_path.exists() or tex_path.stat().st_size != math.prod(shape):
                raise ValueError(f"{tex_path} does not hold {rows} textures of {size}x{size}x3 "
                                 "bytes: the bank is damaged; rebuild it with --force")
            # mode "c" (copy-on-write) gives a writable view for torch without touching the file.
            array = np.memmap(tex_path, np.uint8, mode="c", shape=shape)
        device = torch.device(device)
        nbytes = array.nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            on_gpu = nbytes <= gpu_budget * free
            textures = torch.empty(shape, dtype=torch.uint8,
                                   **({"device": device} if on_gpu else {"pin_memory": True}))
            step = max(1, (256 << 20) // (size * size * 3))    # copy in 256 MiB slices
            for a in range(0, rows, step):
                textures[a:a + step].copy_(torch.from_numpy(array[a:a + step]))
            placement = "cuda" if on_gpu else "pinned"
            where = (f"GPU memory of {device}" if on_gpu else
                     f"pinned host memory (over {gpu_budget:.0%} of the {free / 2**30:.1f} GiB "
                     f"free on {device})")
        elif device.type == "cpu":
            textures, placement = torch.from_numpy(array), "mmap"
            where = "CPU memory (memory-mapped)"
            if storage_of(meta) == "jpeg":
                placement, where = "memory", "CPU memory (decoded)"
        else:
            raise ValueError(f"texture bank device must be cpu or cuda, got {device}")
        # Pinned memory works but costs a host-to-device gather per batch: a warning, not info.
        log.log(logging.WARNING if placement == "pinned" else logging.INFO,
                "texture bank %s: %d textures of %dx%d, %.2f GiB, in %s",
                path, rows, size, size, nbytes / 2**30, where)
        return cls(textures, image_rows, meta, placement)

    def rows_for(self, indices):
        """Texture rows of dataset `indices` (a tensor, on any device): identity for a full bank."""
        dev = indices.device
        if dev not in self._rows_on:
            self._rows_on[dev] = self.image_rows.to(dev)
        return self._rows_on[dev][indices]

    def for_batch(self, indices):
        """(bank, ids) for fastneg.kernels.sample_textures on the device of `indices`.

        A bank on that device is used in place (ids = its rows); a pinned or CPU bank gives up
        just the batch's textures, copied over, with ids 0..N-1.
        """
        import torch
        if self.textures.device == indices.device:
            return self.textures, self.rows_for(indices)
        rows = self.rows_for(indices.cpu())
        picked = self.textures.index_select(0, rows).to(indices.device)
        return picked, torch.arange(len(indices), device=indices.device)


def _check_expected(path: Path, meta: dict, expect) -> None:
    if isinstance(expect, ImageList):
        listing = expect
    elif isinstance(expect, str) and _FINGERPRINT.fullmatch(expect):
        listing = None
    else:
        listing = scan_image_folder(expect)
    want = listing.fingerprint() if listing is not None else expect
    if want != meta["fingerprint"]:
        what = (f"{listing.root} ({len(listing)} images)" if listing is not None
                else f"fingerprint {want[:12]}")
        raise ValueError(f"texture bank {path} was built for {meta['source_root']} "
                         f"({meta['images']} images, fingerprint {meta['fingerprint'][:12]}), "
                         f"not for {what}: rebuild it with fastneg build-bank DATA --out {path} "
                         "--force")
