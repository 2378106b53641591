"""What the benchmark scripts share besides timing and data: their flag types, the machine's
description, the CPU time and memory of a process tree, and the environment of a measured row.
"""
from __future__ import annotations

import argparse
import os
import platform
import threading
from pathlib import Path

from fastneg.data.files import available_cpus

RSS_SAMPLE_S = 0.05


class ProcessTree:
    """CPU time and peak RSS of this process and every live descendant.

    CPU: user + system of each live process, plus the children_* times of each (its reaped
    children), so a worker's time is neither lost when it exits nor counted twice.
    """

    def __init__(self):
        import psutil
        self._psutil = psutil
        self.root = psutil.Process()
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_rss, daemon=True)
        self._thread.start()

    def _members(self):
        return [self.root] + self.root.children(recursive=True)

    def _sum(self, read) -> float:
        total = 0.0
        for p in self._members():
            try:
                total += read(p)
            except (self._psutil.NoSuchProcess, self._psutil.ZombieProcess):
                pass   # exited between listing and reading: its time is in its parent's children_*
        return total

    def cpu_seconds(self) -> float:
        def times(p):
            t = p.cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        return self._sum(times)

    def rss(self) -> int:
        return int(self._sum(lambda p: p.memory_info().rss))

    def _sample_rss(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            self._stop.wait(RSS_SAMPLE_S)

    def pss(self) -> int:
        """Proportional set size of the tree: shared pages split between the processes mapping
        them, so forked workers are not charged for the parent's pages. A page-table walk
        (~30 ms per process), hence read once, outside the timed window."""
        return int(self._sum(lambda p: p.memory_full_info().pss))

    def close(self) -> int:
        """Stop sampling; the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        return max(self.peak_rss, self.rss())


def row_environment() -> dict:
    """The environment of every row: OpenMP threads sleep instead of spinning while they wait.

    Spinning threads of the main process starve the loader's workers whenever the cores are
    shared (measured on 2 cores: the torch loader went from 16 to 258 img/s); a value the
    user set is kept. (Every row's process also keeps freed memory for reuse, as train/moco.py
    does on a CPU: fastneg.host.keep_freed_memory.)
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {available_cpus()} cores usable"


def resolve_device(name: str | None) -> str:
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine")
    return str(dev)


def comma_list(allowed):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma list of {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def last_line(text: str) -> str:
    """The last non-blank line of a child's output (its error, usually)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"
