"""Filesystem safety: files that are replaced whole or not at all, and file locks.

Every module that writes a file a reader or a later run depends on goes through here:

    with atomic_file(out / "checkpoint.pt") as tmp:   # build beside, swap in when whole
        torch.save(state, tmp)
    write_bytes_atomic(path, data)                    # the same for bytes in hand
    with staged_dir(out) as tmp: ...                  # the same for a whole folder
    remove_stale_temporaries(out)                     # what killed writers left behind
    check_writable(out.parent)                        # PermissionError now, not after the work

    lock = hold_lock(out / ".lock", "run directory X")   # exclusive, or FileExistsError
    fd = wait_lock(path)                                 # exclusive, waiting its turn

Atomic files: the content is written to a temporary sibling `.NAME.tmp-PID` (hidden, one per
process, in the same folder so the rename never crosses a filesystem), the file is flushed and
fsynced, renamed over the destination, and the folder is fsynced so that the rename itself
survives a power cut. A reader sees the old version or the new one, never a part; an error
removes the temporary.

Locks are flock(2) locks: held by an open file, released when it is closed or the process
ends (kill -9 included), so a crash never leaves a lock held by nobody.

This module imports nothing from fastneg: every layer may use it.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

TEMPORARY = re.compile(r"\..+\.(?:tmp|partial)-(\d+)")


# ---------------------------------------------------------------- atomic files and folders

def temporary_sibling(path, kind: str = "tmp") -> Path:
    """The name a file or folder is built under beside `path`: `.NAME.KIND-PID` (hidden, and
    one per process, so two writers never share it)."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` to write a file to; when the block ends without an
    error the file is synced to disk and renamed to `path` (see swap_in), otherwise it is
    removed. The writer inside the block must close (or flush) what it opened.

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


def swap_in(tmp, path) -> None:
    """fsync the finished file `tmp`, rename it to `path`, fsync the folder (atomic_file's last
    step, for writers that cannot work inside a with block)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


def write_bytes_atomic(path, data: bytes) -> None:
    """Path(path).write_bytes(data), atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path, text: str) -> None:
    """Path(path).write_text(text) in UTF-8, atomically (see atomic_file)."""
    write_bytes_atomic(path, text.encode())


def sync_folder(folder) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened or synced)."""
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
def staged_dir(out):
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
        sync_folder(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(folder) -> None:
    """A one-line PermissionError now for an output folder this process cannot write to (the
    folder may not exist yet: its first existing parent is checked), before minutes of work."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent          # the folder will be created: its first existing parent
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {probe} (read-only or not yours): choose "
                              "another output file")


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary siblings (`.NAME.tmp-PID`, `.NAME.partial-PID`) in `folder` whose
    process is gone: what a writer killed mid-write leaves. Returns what was removed."""
    removed = []
    for p in sorted(Path(folder).glob(".*-*")):
        m = TEMPORARY.fullmatch(p.name)
        if m and not pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------- locks

def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True           # exists, owned by someone else
    return True


def hold_lock(path, what: str):
    """Lock `path` (created if absent) for this process, without waiting, and write our PID in
    it; returns the open file, which holds the lock until it is closed or the process ends.

    A lock held by a live process raises FileExistsError naming `what` and the holder's PID. A
    lock whose recorded holder is gone but which is still held (by children that outlived it)
    is taken over: the lock file is replaced by a new one, so the orphans hold a lock nobody
    looks at.
    """
    path = Path(path)
    for _ in range(3):
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            f.close()
            pid = int(text) if text.isdigit() else 0
            if pid_alive(pid):
                raise FileExistsError(f"{what} is in use by another process (PID {pid}); wait "
                                      "for it to end or stop it first") from None
            path.unlink(missing_ok=True)   # stale: its holder is gone
            continue
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:                  # replaced between our open and our lock: try again
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f
    raise FileExistsError(f"{what}: could not take its lock {path}; try again")


def wait_lock(path) -> int:
    """Wait for an exclusive lock on `path` (created if needed) and return its descriptor;
    os.close(fd) releases it. For work done once by whichever process comes first, the others
    waiting and then reading its result (the dataset index)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd
