"""Write files and folders so that a reader sees the old version or the new one, never a part:
build beside the destination, swap in when whole."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """The name a file or folder is built under beside `path`: `.NAME.KIND-PID` (hidden, and
    one per process, so two writers never share it)."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path` to write a file to; when the block ends without an
    error the file is synced to disk and renamed to `path`, otherwise it is removed.

        with atomic_file(out / "checkpoint.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        swap_in(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def swap_in(tmp: Path, path: Path) -> None:
    """Sync the finished file `tmp` to disk and rename it to `path` (atomic_file's last step,
    for writers that cannot work inside a with block)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_folder(Path(path).parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Path(path).write_bytes(data), atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_dir(out: Path):
    """Yield an empty sibling folder of `out`; on success it replaces `out`, on error it is
    removed, so an interrupted build never leaves a folder that looks complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(folder: Path) -> None:
    """A one-line error now for an output folder this process cannot write to."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent          # the folder will be created: its first existing parent
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {probe} (read-only or not yours): choose "
                              "another output file")
