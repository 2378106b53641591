"""Is the GPU usable? Checks that keep a GPU run from quietly training on the CPU.

torch.cuda.is_available() is False both on a machine without a GPU and on one whose NVIDIA
driver is too old for torch's CUDA build; a trainer that picks its device from it alone would
then train ResNet-50 on the CPU without a word. refuse_cpu_fallback() turns those cases into an
error that names torch's CUDA version and the driver's.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastneg import versions

# The NVIDIA kernel driver publishes itself here on Linux (a kernel interface, on every machine).
NVIDIA_DRIVER_DIR = Path("/proc/driver/nvidia")


def nvidia_driver_version(driver_dir: Path | None = None) -> str | None:
    """The loaded NVIDIA kernel driver's version ("550.54.15"), "unknown" when the driver is
    loaded but its version file is unreadable, or None when no NVIDIA driver is loaded."""
    driver_dir = NVIDIA_DRIVER_DIR if driver_dir is None else Path(driver_dir)
    if not driver_dir.exists():
        return None
    try:
        text = (driver_dir / "version").read_text(errors="replace")
    except OSError:
        return "unknown"
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024"
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text) \
        or re.search(r"\b(\d{3,}(?:\.\d+)+)\b", text)
    return found.group(1) if found else "unknown"


def refuse_cpu_fallback(requested: str | None, preset: str | None = None) -> None:
    """Raise ValueError (a one-line message) when this run would train on the CPU though a GPU
    run was meant: no usable GPU and either a `paper-*` preset or a loaded NVIDIA driver that
    torch cannot use. requested: the --device flag as given (None when not given); "cpu" always
    passes, and so does any run while torch can use a GPU. Plain CPU runs (no preset, no NVIDIA
    driver) pass. A usable GPU with a numba-cuda below fastneg.versions.CUDA_FLOOR is refused
    too, naming the version needed.
    """
    if requested == "cpu":
        return
    if torch.cuda.is_available():
        too_old = versions.cuda_problems()     # the CUDA kernels would fail on first compile
        if too_old:
            raise ValueError("; ".join(too_old) + " (or pass --device cpu)")
        return
    driver = nvidia_driver_version()
    if driver is not None:
        raise ValueError(
            f"this machine has NVIDIA driver {driver} but torch {torch.__version__} (built for "
            f"CUDA {torch.version.cuda or 'none: a CPU-only build'}) cannot use it "
            "(torch.cuda.is_available() is False: driver too old for this CUDA, or a CPU build "
            "of torch); fix the driver or the torch build, or pass --device cpu to train on "
            "the CPU")
    if preset is not None and preset.startswith("paper-"):
        raise ValueError(f"--preset {preset} trains ResNet-50 at 224 px and needs a GPU, but "
                         f"torch {torch.__version__} sees none; pass --device cpu to train on "
                         "the CPU anyway")
