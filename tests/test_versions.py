"""The import-time floor check (fastneg.versions): one line naming each package below its floor,
nothing for a supported or absent one, and the floor agreeing with pyproject.toml."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from fastneg import versions

REPO = Path(__file__).resolve().parents[1]
FLOOR_SET = {"torch": "2.11.0+cu130", "torchvision": "0.26.0", "numpy": "2.4.0",
             "numba": "0.67.0", "numba-cuda": "0.30.4"}


def test_the_floor_itself_and_newer_releases_pass():
    assert versions.problems(FLOOR_SET) == []
    assert versions.problems({**FLOOR_SET, "torch": "2.14.1", "numpy": "2.5.5"}) == []
    assert versions.cuda_problems(FLOOR_SET) == []
    assert versions.cuda_problems({**FLOOR_SET, "numba-cuda": None}) == []   # optional: absent is fine


@pytest.mark.parametrize("name, old", [("torch", "2.10.0+cu128"), ("torchvision", "0.25.0"),
                                       ("numpy", "2.3.5"), ("numba", "0.66.0"),
                                       ("numba-cuda", "0.30.0"), ("numba-cuda", "0.29.9")])
def test_each_package_below_its_floor_is_named_with_the_version_needed(name, old):
    floors = {**versions.FLOOR, **versions.CUDA_FLOOR}
    floor, why = floors[name]
    expected = [f"fastneg needs {name} >= {floor} (found {old}; {why})"]
    if name in versions.CUDA_FLOOR:      # checked where a GPU run starts, not at import
        assert versions.cuda_problems({**FLOOR_SET, name: old}) == expected
        assert versions.problems({**FLOOR_SET, name: old}) == []
        return
    assert versions.problems({**FLOOR_SET, name: old}) == expected
    with pytest.raises(ImportError) as e:
        versions.check({**FLOOR_SET, name: old})
    assert "\n" not in str(e.value) and f"{name} >= {floor}" in str(e.value)


def test_release_parsing():
    assert versions._release("2.11.0+cu130") == (2, 11, 0)
    assert versions._release("0.30.4rc1") == (0, 30, 4)
    assert versions._release("2.5") == (2, 5)
    assert versions._release("1.0.dev3") == (1, 0)


def test_the_floor_is_pyprojects_lower_bound():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cuda"]]
    lower = {r.name: Version(s.version) for r in reqs for s in r.specifier if s.operator == ">="}
    for name, (floor, _) in {**versions.FLOOR, **versions.CUDA_FLOOR}.items():
        assert lower[name] == Version(floor), (name, str(lower[name]), floor)


def test_importing_fastneg_below_the_floor_fails_in_one_line(tmp_path):
    # a fake torch distribution of an old release, first on the path
    dist = tmp_path / "torch-2.10.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    code = "import fastneg"
    env_path = f"{tmp_path}:{REPO}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("ImportError: fastneg needs torch >= 2.11 (found 2.10.0; "
                    "the oldest torch fastneg is tested with)"), r.stderr[-500:]
