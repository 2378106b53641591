"""Building texture banks: `fastneg build-bank` (build_bank: image quilting, resumable), banks
of given textures (write_bank_from_arrays) and the preview grid (write_preview). The folder's
format and reading it back: fastneg.texture.store.

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
textures.jpg back to the end of the last span marked done). index.json is replaced atomically
(fastneg.fs) and says `complete` only after the last sync. Texture i depends only on (seed, i),
so a resumed or parallel build writes the same bytes as a serial one.

write_bank_from_arrays writes a complete jpeg bank from textures given as arrays (benchmarks,
tests: the format without the synthesis).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
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
from fastneg.texture.store import (BANK_FILES, DONE_FILE, FORMAT, INDEX_FILE, JPEG_FILE,
                                   LOCK_FILE, ROWS_FILE, SOURCES_FILE, SPANS_FILE, STORAGES,
                                   TEXTURES_FILE, VERSION, BankReader, read_index, storage_of)



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
