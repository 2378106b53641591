"""The version contract: pyproject.toml states ranges from the supported floor up to the newest
tested release; constraints/tested.txt pins the tested default (`make setup`) and
constraints/compat.txt the floor (`make test-compat`). Both sets must lie inside the ranges, and
the floor set must sit on the ranges' lower bounds, or the floor claimed is not the one tested."""
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["cuda"]]
    return {r.name: r.specifier for r in reqs}


def _constraints(name):
    reqs = {}
    for line in (REPO / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            reqs[r.name] = r.specifier
    return reqs


def _lowest(spec):
    """The lowest release a specifier of ==X.Y.*, ==X.Y.Z or >=X.Y admits."""
    for s in spec:
        if s.operator in ("==", ">="):
            return Version(s.version.removesuffix(".*"))
    raise AssertionError(f"no lower bound in {spec}")


@pytest.mark.parametrize("name", ["tested.txt", "compat.txt"])
def test_each_constrained_package_is_a_dependency_and_its_pin_lies_in_the_range(name):
    ranges = _ranges()
    for package, spec in _constraints(name).items():
        assert package in ranges, f"{name} constrains {package}, which pyproject does not require"
        low = _lowest(spec)
        assert ranges[package].contains(low), (name, package, str(spec), str(ranges[package]))


def test_the_tested_set_pins_torch_torchvision_numba_exactly():
    tested = _constraints("tested.txt")
    for package in ("torch", "torchvision", "numba", "numba-cuda"):
        ops = {s.operator for s in tested[package]}
        assert ops == {"=="} and "*" not in str(tested[package]), (package, str(tested[package]))


def test_the_compat_set_is_the_floor_of_the_ranges():
    ranges, compat = _ranges(), _constraints("compat.txt")
    for package in ("torch", "torchvision", "numba", "numba-cuda"):
        floor = _lowest(ranges[package])
        assert _lowest(compat[package]) == floor, (package, str(compat[package]), str(floor))


def test_the_make_targets_install_through_their_constraints_files():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-c \$\(CONSTRAINTS\) -e", makefile)
    assert "CONSTRAINTS := constraints/tested.txt" in makefile
    assert re.search(r"pip install .*-c constraints/compat\.txt -e", makefile)
