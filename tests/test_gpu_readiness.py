"""GPU readiness checks that make sense on a CPU machine: the packaging of the CUDA extra, the
trainer's refusal to train a GPU preset on the CPU by accident, and the shuffle-BN seed."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _extra(name):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"][name]]


def test_cuda_extra_brings_nvvm_for_torchs_cuda_major():
    reqs = {r.name: r for r in _extra("cuda")}
    numba_cuda = reqs["numba-cuda"]
    # the cu13 extra is the one that installs NVVM/libdevice (cuda-toolkit[...,nvvm]) for CUDA 13
    assert numba_cuda.extras == {"cu13"}, numba_cuda
    # no wheel built for another CUDA major (cupy-cuda12x, nvidia-*-cu12, ...)
    assert not [r for r in reqs.values() if "12" in r.name.replace("numba-cuda", "")], reqs
    # torch's CUDA build (from its wheel's dependencies) is the same major
    torch_cuda = [r for r in importlib.metadata.requires("torch") or [] if "-cu1" in r]
    if torch_cuda:
        assert all("-cu13" in r for r in torch_cuda), torch_cuda
    if torch.version.cuda is not None:
        assert torch.version.cuda.split(".")[0] == "13"


def test_installed_numba_cuda_has_the_cu13_extra_with_nvvm():
    try:
        meta = importlib.metadata.metadata("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("numba-cuda is not installed (the cuda extra of this project needs it)")
    assert "cu13" in meta.get_all("Provides-Extra")
    pinned = next(r for r in _extra("cuda") if r.name == "numba-cuda")
    assert pinned.specifier.contains(meta["Version"]), (pinned, meta["Version"])
    cu13 = [Requirement(r) for r in meta.get_all("Requires-Dist")
            if "extra" in r and Requirement(r).marker.evaluate({"extra": "cu13"})]
    toolkit = [r for r in cu13 if r.name == "cuda-toolkit"]
    assert toolkit and "nvvm" in toolkit[0].extras, cu13
