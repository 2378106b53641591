"""benchmarks/throughput.py, its published baseline and benchmarks/moco_step.py, on tiny data."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastneg.benchmarking import common, published, timing
from fastneg.benchmarking import data as bench_data
from fastneg.data.synthetic import DatasetSpec, make_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    """A benchmarks/ script as a module, without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("bench") / "shapes",
                        DatasetSpec(images_per_class=4, size=32), progress=False)
    return root / "train"


def _torch_loader_available() -> bool:
    try:
        from fastneg.loaders import build_loader  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_throughput_smoke_reports_every_requested_row(tiny_data, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (fastneg[eval])")
    out, plot = tmp_path / "rows.json", tmp_path / "rows.png"
    # Few rows: each is a fresh process that compiles its kernels (~10 s on 2 cores).
    loaders, negatives = ["torch"], ["patch", "texture"]
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--data", str(tiny_data),
           "--loaders", ",".join(loaders), "--negatives", ",".join(negatives),
           "--size", "64", "--batch-size", "8", "--batches", "2", "--warmup", "1",
           "--workers", "1", "--device", "cpu", "--json", str(out), "--plot", str(plot),
           "--no-goals"]    # the start-up probes compile every kernel: their own test below
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    assert isinstance(records, list)
    wanted = {("published", n) for n in negatives} | {(k, n) for k in loaders for n in negatives}
    assert {(r["loader"], r["negatives"]) for r in records} == wanted
    assert len(records) == len(wanted)
    baseline = {r["negatives"]: r for r in records if r["loader"] == "published"}
    for r in records:
        assert set(throughput.RECORD_KEYS) <= r.keys()
        assert r["device"] == "cpu"
        if r["status"] != "ok":
            assert r["status"] in ("unavailable", "failed") and r["reason"], r
            assert r["img_per_s"] is None and r["ratio_vs_baseline"] is None
            continue
        assert r["img_per_s"] > 0 and r["cpu_s_per_1k"] >= 0 and r["peak_rss_mb"] > 0
        assert r["warmup_s"] > 0
        expected = r["img_per_s"] / baseline[r["negatives"]]["img_per_s"]
        assert r["ratio_vs_baseline"] == pytest.approx(expected)
    # The baseline is the benchmark's own code: it must always run.
    assert all(b["status"] == "ok" and b["ratio_vs_baseline"] == 1.0 for b in baseline.values())
    if _torch_loader_available():
        assert all(r["status"] == "ok" for r in records if r["loader"] == "torch"), records
        # the bare loader's rate (its own hidden row) shows in every row of that loader
        assert all(r["loader_img_per_s"] > 0 for r in records if r["loader"] == "torch"), records
    assert plot.stat().st_size > 0
    table_rows = done.stdout.strip().splitlines()[-len(records):]   # the table is printed last
    assert [ln.split()[:2] for ln in table_rows] == [[r["loader"], r["negatives"]] for r in records]


def test_throughput_bad_data_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert throughput.main(["--data", str(missing), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_ratios_compare_rows_with_the_baseline_of_the_same_negatives():
    rec = throughput._record
    records = [rec("published", "none", "cpu", status="ok", img_per_s=50.0),
               rec("published", "patch", "cpu", status="ok", img_per_s=20.0),
               rec("torch", "none", "cpu", status="ok", img_per_s=150.0),
               rec("torch", "patch", "cpu", status="ok", img_per_s=90.0),
               rec("dali", "patch", "cpu", status="unavailable", reason="ImportError: x")]
    throughput.add_ratios(records)
    assert [r["ratio_vs_baseline"] for r in records] == [1.0, 1.0, 3.0, 4.5, None]
    lines = throughput.format_table(records).splitlines()
    assert len(lines) == 2 + len(records) and "unavailable: ImportError: x" in lines[-1]


def test_loader_only_rows_and_start_up_fold_into_the_rows_of_their_loader():
    rec = throughput._record
    records = [rec("published", "patch", "cpu", status="ok", img_per_s=20.0),
               rec("torch", "none", "cpu", status="ok", img_per_s=150.0),
               rec("torch", "patch", "cpu", status="ok", img_per_s=90.0),
               rec("torch", throughput.LOADER_ONLY, "cpu", status="ok", img_per_s=120.0),
               rec("dali", "patch", "cpu", status="ok", img_per_s=80.0),
               rec("dali", throughput.LOADER_ONLY, "cpu", status="failed", reason="x")]
    kept = throughput.add_loader_rates(records, {"torch": (30.0, 2.0)}, "patch")
    throughput.add_ratios(kept)
    assert [(r["loader"], r["negatives"]) for r in kept] == [
        ("published", "patch"), ("torch", "none"), ("torch", "patch"), ("dali", "patch")]
    assert [r["of_loader"] for r in kept] == [None, 1.25, 0.75, None]
    assert kept[2]["first_batch_warm_s"] == 2.0 and kept[1]["first_batch_warm_s"] is None
    copy = {"float32 NCHW": {"memory": 0.8, "cache": 0.5, "memory_trials": [0.6, 0.8, 0.9]},
            "uint8 NHWC": {"memory": 0.75, "cache": 0.4}}
    line = throughput.goals_line(kept, copy, {"torch": (30.0, 2.0)})
    assert "float32 NCHW 80% from memory (60%-90% over 3 trials), 50% in cache" in line, line
    # torch: 75% of its loader, 4.5x the baseline; copy >= 70% from memory (the goal; in cache
    # is shown only); warm start 2 s
    assert line.count("PASS") == 3 and "FAIL" not in line, line
    records[2]["img_per_s"] = 60.0
    kept = throughput.add_loader_rates(records, {"torch": (30.0, 6.0)}, "patch")
    throughput.add_ratios(kept)
    copy["float32 NCHW"] = {"memory": 0.6, "cache": 0.9}
    line = throughput.goals_line(kept, copy, {"torch": (30.0, 6.0)})
    assert line.count("FAIL") == 3 and "PASS" not in line, line   # 60/120 = 50%; 60% copy; 6 s


def test_texture_goal_compares_texture_with_patch_on_the_same_loader():
    rec = throughput._record
    records = [rec("published", "patch", "cpu", status="ok", img_per_s=20.0),
               rec("published", "texture", "cpu", status="ok", img_per_s=5.0),
               rec("torch", "patch", "cpu", status="ok", img_per_s=100.0),
               rec("torch", "texture", "cpu", status="ok", img_per_s=80.0),
               rec("ffcv", "patch", "cpu", status="ok", img_per_s=200.0),
               rec("ffcv", "texture", "cpu", status="ok", img_per_s=180.0)]
    line = throughput.goals_line(records, None, {})
    assert "texture NS >= 85% of patch NS (same loader): PASS (torch 80%, ffcv 90%)" in line
    records[-1]["img_per_s"] = 160.0
    assert "(same loader): FAIL (torch 80%, ffcv 80%)" in throughput.goals_line(records, None, {})
    records[-1]["status"] = "failed"
    records[3]["status"] = "unavailable"
    assert "(same loader): n/a" in throughput.goals_line(records, None, {})


def _finished_texture_batch(kind, source, bank):
    batches = bench_data.FastnegBatches(kind, source, batch_size=4, size=16, device="cpu",
                                        workers=1, negatives="texture", texture_bank=bank)
    views, negatives = next(iter(batches))
    return batches, views, negatives


def test_texture_rows_read_a_jpeg_bank_through_the_loader(tiny_data, tmp_path):
    from fastneg.data.imagefolder import scan_image_folder
    from fastneg.texture.store import BankReader
    bank = bench_data.write_texture_bank(tiny_data, 16, tmp_path)
    n = len(scan_image_folder(tiny_data))
    reader = BankReader(bank, expect=tiny_data)
    assert reader.storage == "jpeg" and reader.rows == n and reader.size == 16
    # the baseline's texture files are kept: the first TEXTURE_BANK_SIZE images
    assert len(list(tmp_path.glob("texture_*.jpg"))) == min(n, bench_data.TEXTURE_BANK_SIZE)
    if "torch" not in _available_kinds():
        pytest.skip("no torch loader here")
    batches, views, negatives = _finished_texture_batch("torch", tiny_data, bank)
    [tex] = negatives
    assert tex.shape == views[0].shape == (4, 3, 16, 16) and torch.isfinite(tex).all()
    assert batches.loader.cfg.texture_bank == str(bank)


@pytest.mark.slow
def test_ffcv_texture_rows_use_a_beton_with_the_texture_field(tiny_data, tmp_path):
    if "ffcv" not in _available_kinds():
        pytest.skip("ffcv missing")
    bank = bench_data.write_texture_bank(tiny_data, 16, tmp_path)
    beton = bench_data.prepare_ffcv(tiny_data, 240, texture_bank=bank,
                                    beton=tmp_path / bench_data.TEXTURE_BETON)
    args = throughput.build_parser().parse_args(
        ["--data", str(tiny_data), "--workdir", str(tmp_path), "--size", "16",
         "--batch-size", "4", "--workers", "1", "--source", str(tmp_path / "plain.beton")])
    built = throughput._build_row(args, "ffcv", "texture", torch.device("cpu"))
    assert built.source == beton and built.loader.cfg.texture_bank == str(bank)
    views, [tex] = next(iter(built))
    assert tex.shape == views[0].shape == (4, 3, 16, 16) and torch.isfinite(tex).all()


def test_a_missing_texture_beton_makes_the_ffcv_texture_row_unavailable(tiny_data, tmp_path):
    (tmp_path / "texture-beton-error.txt").write_text("'fastneg convert --to ffcv' failed: x")
    args = throughput.build_parser().parse_args(["--data", str(tiny_data),
                                                 "--workdir", str(tmp_path)])
    with pytest.raises(RuntimeError, match="no texture .beton: 'fastneg convert"):
        throughput._build_row(args, "ffcv", "texture", torch.device("cpu"))


def _available_kinds():
    try:
        from fastneg.loaders import available_kinds
    except ImportError:
        return ()
    return available_kinds()


def test_a_loader_known_to_be_unavailable_is_reported_without_running(tmp_path):
    args = throughput.build_parser().parse_args(["--data", str(tmp_path)])
    [rec] = throughput.run_rows(args, [("ffcv", "patch")], "cpu", tmp_path, {},
                                {"ffcv": "'fastneg convert --to ffcv' failed: no space"})
    assert rec["status"] == "unavailable" and "no space" in rec["reason"]
    assert set(throughput.RECORD_KEYS) <= rec.keys() and rec["img_per_s"] is None


def test_process_tree_counts_cpu_of_exited_children():
    tree = common.ProcessTree()
    before = tree.cpu_seconds()
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    spent = tree.cpu_seconds() - before
    assert tree.close() > 0
    assert spent >= 0.25


def test_published_patch_loop_copies_windows_of_the_query():
    size, lo, hi = 20, 3, 7
    q = torch.arange(3 * size * size, dtype=torch.float32).view(3, size, size)
    rng = np.random.default_rng(1)
    for _ in range(20):
        ns = published.patch_negative_loop(q, (lo, hi), rng)
        assert ns.shape == q.shape
        # q[c, y, x] = c*S*S + y*S + x, so a tile's first pixel says where its window starts.
        y, x = divmod(int(ns[0, 0, 0]), size)
        d = next(d for d in range(hi, lo - 1, -1)
                 if torch.equal(ns[:, :d, :d], q[:, y:y + d, x:x + d]))
        assert lo <= d <= hi and y < size - d and x < size - d


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["patch", "texture"])
def test_moco_step_smoke_on_cpu(tiny_data, tmp_path, negatives):
    pytest.importorskip("fastneg.moco")
    out = tmp_path / "step.json"
    cmd = [sys.executable, str(BENCH / "moco_step.py"), "--device", "cpu", "--arch", "resnet10s",
           "--size", "32", "--batch-size", "4", "--queue", "16", "--steps", "1", "--warmup", "1",
           "--precision", "fp32", "--loaders", "torch", "--workers", "1",
           "--data", str(tiny_data), "--json", str(out), "--negatives", negatives]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["ceiling"]["img_per_s"] > 0
    [row] = result["rows"]
    assert row["loader"] == "torch"
    if _torch_loader_available():
        assert row["status"] == "ok", row
        assert row["vs_ceiling"] == pytest.approx(row["img_per_s"] / result["ceiling"]["img_per_s"])
        assert 0 <= row["data_wait_pct"] <= 100
    else:
        assert row["status"] == "unavailable" and row["reason"]


def test_patch_vs_copy_gives_speed_fractions_per_layout_from_memory_and_in_cache():
    """The goals line's copy comparison: device-seconds ratios, positive and finite."""
    fractions = timing.patch_vs_copy(2, 16, "cpu", repeats=1, trials=3)
    assert set(fractions) == {"float32 NCHW", "uint8 NHWC"}
    for f in fractions.values():
        assert set(f) == {"memory", "cache", "memory_trials", "cache_trials"}
        for key in ("memory", "cache"):
            trials = f[f"{key}_trials"]
            assert len(trials) == 3 and all(0 < v < float("inf") for v in trials)
            assert f[key] == sorted(trials)[1]          # the median trial


def test_copy_probe_runs_in_a_child_with_the_rows_environment(tmp_path):
    """The copy comparison runs in a child process (OMP_WAIT_POLICY of the rows) and comes back
    as the same dictionary."""
    args = throughput.build_parser().parse_args(["--batch-size", "2", "--size", "16"])
    copy = throughput.measure_copy(args, "cpu", tmp_path)
    assert copy is not None and set(copy) == {"float32 NCHW", "uint8 NHWC"}
    assert all(v["memory"] > 0 and v["cache"] > 0 for v in copy.values())


def test_last_level_cache_is_read_from_sysfs():
    size = timing.last_level_cache_bytes()
    assert size is None or size >= 1 << 16    # at least 64 KiB where the kernel reports one

def test_launch_overhead_reports_each_layer_or_why_not():
    cmd = [sys.executable, str(BENCH / "launch_overhead.py"), "--launches", "40", "--block", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = {ln.split()[0]: ln.split()[1:] for ln in done.stdout.splitlines()
            if not ln.startswith("#")}
    assert set(rows) == {"omp", "tbb", "workqueue"}
    for cells in rows.values():
        assert cells[0] == "unavailable:" or (len(cells) == 2 and all(float(c) > 0 for c in cells))


def test_launch_overhead_bad_layer_is_a_clear_error():
    done = subprocess.run([sys.executable, str(BENCH / "launch_overhead.py"), "--layers", "gcd"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "layers must be a comma list" in done.stderr
    assert "Traceback" not in done.stderr
