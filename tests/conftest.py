"""Test markers (declared in pyproject.toml):

- ``cuda``: needs a real NVIDIA GPU; skipped on machines without one.
- ``cudasim``: runs numba.cuda kernels under Numba's CUDA simulator. The simulator must be
  switched on (NUMBA_ENABLE_CUDASIM=1) before numba is first imported, so these tests run in a
  pytest process of their own (``make test`` runs ``pytest -m cudasim`` with the variable set)
  and are skipped in the main process.
- ``slow``: takes more than a few seconds; included in ``make test``.
"""
import os

import pytest

CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    gpu = _has_gpu()
    for item in items:
        if "cuda" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
        if "cudasim" in item.keywords and not CUDASIM:
            item.add_marker(pytest.mark.skip(
                reason="run in its own process with NUMBA_ENABLE_CUDASIM=1 (make test does)"))
