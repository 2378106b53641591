"""What keeps a run directory whole through kills, full disks and a second trainer.

The trainer (fastneg.train) calls these at a few points:

    lock = fs.hold_lock(out / LOCK_FILE, f"run directory {out}")   # rank 0, the whole run
    refuse_existing_run(out, resuming)       # a new run never overwrites a run's checkpoints
    fs.remove_stale_temporaries(out)         # .checkpoint*.pt.tmp-PID files of dead processes
    path, ckpt, note = resume_checkpoint(arg)   # RUN_DIR -> checkpoint.pt or newest epoch
    cut_log(out / "log.csv", step)           # on resume: no step is logged twice
    save_atomic(state, path)                 # fs.atomic_file; a full disk is one clear error
    restore(model, optimizer, scaler, ckpt, path)   # weights that do not fit: one clear error
    stop = StopRequest(); stop.install()     # SIGTERM/SIGHUP or the torchrun agent gone:
    if stop.requested(): ...                 # the loop writes a checkpoint and exits

Every user-facing failure is a RunDirError (a ValueError: the trainer prints it on one line).
This module holds run policy only; atomic writes and the lock are fastneg.fs's.
"""
from __future__ import annotations

import csv
import errno
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from fastneg.data.files import UnreadableFiles  # noqa: F401  (the trainer catches it from here)
from fastneg.fs import atomic_file

LOCK_FILE = ".lock"
CHECKPOINT = "checkpoint.pt"
EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch(\d+)\.pt")


class RunDirError(ValueError):
    """A run directory problem the user can fix; the message names the file."""


# ---------------------------------------------------------------- start of a run

def check_writable(out) -> None:
    """Create `out` and make sure files can be written in it (RunDirError if not)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to the run directory {out} ({e.strerror or e}): "
                          "choose another --out") from None


def refuse_existing_run(out, resuming: bool) -> None:
    """A new run (not --resume) into a folder that holds a run's checkpoints is refused."""
    out = Path(out)
    if resuming or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir()
                   if p.name == CHECKPOINT or EPOCH_CHECKPOINT.fullmatch(p.name))
    if found:
        raise RunDirError(f"--out {out} already holds a run ({', '.join(found[:2])}); continue "
                          f"it with --resume {out} or choose another --out")


def resume_checkpoint(arg) -> tuple[Path, dict, str | None]:
    """(checkpoint file, its content, note) for --resume ARG: a file is itself; a run directory
    gives its checkpoint.pt, or when that is missing or unreadable the newest epoch checkpoint
    that reads back whole, with a note saying so. RunDirError when there is none; a file that
    fails read_checkpoint raises its ValueError."""
    from fastneg.moco import read_checkpoint
    path = Path(arg)
    if not path.is_dir():
        return path, read_checkpoint(path), None
    latest = path / CHECKPOINT
    if latest.exists():
        try:
            return latest, read_checkpoint(latest), None
        except ValueError as e:
            why = f"{latest} cannot be used ({e})"
    else:
        why = f"{latest} does not exist"
    epochs = sorted((int(m.group(1)), p) for p in path.iterdir()
                    if (m := EPOCH_CHECKPOINT.fullmatch(p.name)))
    for _, p in reversed(epochs):
        try:
            ckpt = read_checkpoint(p)
        except ValueError:
            continue
        return p, ckpt, f"{why}; resuming from {p.name}, the newest complete epoch checkpoint"
    raise RunDirError(f"--resume {path}: {why} and no complete checkpoint_epochNNN.pt is there")


def cut_log(log_csv, step: int) -> int:
    """Drop the rows of log.csv logged after `step` (the checkpoint's), so that a resumed run
    does not log a step twice. Returns how many rows were dropped."""
    log_csv = Path(log_csv)
    if not log_csv.exists():
        return 0
    with open(log_csv, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    keep = [r for r in body if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(body):
        return 0
    with atomic_file(log_csv) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([header, *keep])
    return len(body) - len(keep)


# ---------------------------------------------------------------- checkpoints

def _nbytes(obj) -> int:
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_atomic(state, path, save=None) -> None:
    """save(state, tmp) inside fastneg.fs.atomic_file(path): a crash never leaves a half
    checkpoint, and the previous one stays intact. On a write error the tmp file is removed; a
    full disk is
    reported as "disk full while writing PATH (N MB needed)". save defaults to torch.save."""
    if save is None:
        import torch
        save = torch.save
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            save(state, tmp)
    except (OSError, RuntimeError) as e:   # torch's zip writer reports ENOSPC as RuntimeError
        need = _nbytes(state) / 2**20
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        if not full:
            try:
                full = shutil.disk_usage(path.parent).free < _nbytes(state)
            except OSError:
                pass
        if full:
            raise RunDirError(f"disk full while writing {path} ({need:.0f} MB needed); the "
                              "previous checkpoint is intact") from None
        if isinstance(e, OSError):
            raise RunDirError(f"cannot write {path} ({e.strerror or e})") from None
        raise


def restore(model, optimizer, scaler, ckpt: dict, path) -> int:
    """Load a checkpoint's states; returns its step. Weights or optimizer state that do not
    fit the model built from the run's args are a RunDirError naming the file."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        return int(ckpt["step"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = " ".join(lines[:2])[:300] or type(e).__name__
        raise RunDirError(f"checkpoint {path} does not fit the model its args describe "
                          f"({detail})") from None


# ---------------------------------------------------------------- stopping cleanly

class StopRequest:
    """A request to stop after the current step: SIGTERM or SIGHUP (torchrun forwards its own
    SIGTERM to the workers), or, under torchrun, the agent (our parent) gone (its workers are
    then re-parented). The training loop checks `requested()` at its log points, saves a
    checkpoint and ends; a later --resume continues the run.

    The parent is watched only under torchrun: a plain `python train/moco.py` keeps running
    when its shell exits (nohup).
    """

    def __init__(self, watch_parent: bool | None = None):
        if watch_parent is None:
            watch_parent = "TORCHELASTIC_RUN_ID" in os.environ
        self.parent = os.getppid() if watch_parent else None
        self.reason: str | None = None
        self._previous = {}

    def install(self) -> StopRequest:
        """Catch SIGTERM and SIGHUP until uninstall() (main thread only; elsewhere a no-op)."""
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self) -> str | None:
        """The reason to stop, or None."""
        if self.reason is None and self.parent is not None and os.getppid() != self.parent:
            self.reason = f"the parent process {self.parent} (torchrun's agent) is gone"
        return self.reason

    def agreed(self, distributed: bool, device) -> str | None:
        """requested(), agreed by all ranks (one all-reduce): every rank stops at one step."""
        reason = self.requested()
        if not distributed:
            return reason
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1.0 if reason else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and reason is None:
            self.reason = reason = "another rank was asked to stop"
        return reason


def note(message: str) -> None:
    print(f"train/moco.py: {message}", file=sys.stderr, flush=True)
