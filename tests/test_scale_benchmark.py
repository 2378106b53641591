"""benchmarks/scale.py on tiny sizes: the table and JSON it writes, and its refusal to touch a
folder it did not generate."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keep_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(SystemExit) as exit_:
        _load().main(["--keep", str(mine), "--json", str(tmp_path / "s.json")])
    assert exit_.value.code == 2 and "was not written by this benchmark" in capsys.readouterr().err
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCRIPT), "--images", "200", "--classes", "4", "--entries", "500",
           "--ranks", "2", "--json", str(out), "--keep", str(tmp_path / "folder")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["folder_ranks"]) == len(result["synthetic_ranks"]) == 2
    assert all(r["first_batch_warm_s"] > 0 and r["index_rss_mb"] >= 0
               for r in result["folder_ranks"])
    rows = {r["metric"]: r for r in result["table"]}
    assert rows["index build, once per dataset (s)"]["extrapolated"] > 0
    assert "| index read per rank (s, max) |" in proc.stdout
    assert len(list((tmp_path / "folder").rglob("*.JPEG"))) == 200    # kept
