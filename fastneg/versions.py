"""The oldest releases fastneg supports, checked once when the package is imported.

pip enforces the ranges of pyproject.toml at install time, but fastneg also runs from a
checkout with whatever the machine already has (`PYTHONPATH=. python ...`, as on a bare GPU
machine). Below the floor the failure would come from deep inside a library (an attribute
missing from numba.cuda, a keyword torch does not know); this check turns it into one line
that names the package, the version needed and the version found. The floor is the set
`make test-compat` tests (constraints/compat.txt); docs/compatibility.md says why each one.

Only installed distributions are read (importlib.metadata): importing this module imports
neither torch nor numba.
"""
from __future__ import annotations

import importlib.metadata

# distribution name -> (oldest supported release, why; the why ends the error line)
FLOOR = {
    "torch": ("2.11", "the oldest torch fastneg is tested with"),
    "torchvision": ("0.26", "the torchvision of torch 2.11"),
    "numpy": ("2.4", "the oldest numpy fastneg is tested with"),
    "numba": ("0.67", "the first numba that accepts numpy 2.5"),
}
# Needed by the CUDA kernels only (fastneg[cuda]), which import numba.cuda when first compiled:
# checked where a GPU run starts (fastneg.gpu.refuse_cpu_fallback), so that a CPU-only user with
# an old numba-cuda keeps a working package.
CUDA_FLOOR = {
    "numba-cuda": ("0.30.4", "older releases fail to import numba.cuda with numba >= 0.66"),
}


def _release(text: str) -> tuple[int, ...]:
    """(2, 11, 0) from '2.11.0+cu130', '2.11', '0.30.4rc1'... : the leading numeric release
    (a pre-release of the floor counts as the floor)."""
    parts = []
    for piece in text.split("+", 1)[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):      # '4rc1': the release ends at the pre-release tag
            break
    return tuple(parts)


def problems(installed: dict[str, str | None] | None = None, floors: dict | None = None
             ) -> list[str]:
    """One line per package below its floor, e.g. 'fastneg needs torch >= 2.11 (found 2.10.0;
    the oldest torch fastneg is tested with)'. `installed` maps distribution name to version
    (None: not installed); by default it is read from the environment. `floors`: FLOOR unless
    given (CUDA_FLOOR for the CUDA stack). A package that is not installed is no problem here:
    the import that needs it reports it."""
    floors = FLOOR if floors is None else floors
    if installed is None:
        installed = {}
        for name in floors:
            try:
                installed[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed[name] = None
    found = []
    for name, (floor, why) in floors.items():
        version = installed.get(name)
        if version is not None and _release(version) < _release(floor):
            found.append(f"fastneg needs {name} >= {floor} (found {version}; {why})")
    return found


def cuda_problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """problems() of the CUDA stack (CUDA_FLOOR)."""
    return problems(installed, CUDA_FLOOR)


def check(installed: dict[str, str | None] | None = None) -> None:
    """Raise ImportError with one line naming every package below its floor (FLOOR)."""
    found = problems(installed)
    if found:
        raise ImportError("; ".join(found))
