"""benchmarks/gpu_check.sh and its Python stages on a CPU machine: the whole script in a Python
where every optional package is hidden (it must run to the end, GPU stages skipped, exit 0),
and the stages that can run without a GPU."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("tqdm", "scipy", "matplotlib", "psutil", "pytest", "nvidia", "ffcv", "cupy")

# Imported by every Python the script starts (PYTHONPATH): importing a hidden package fails as
# if it were not installed.
SHIM = f'''
import sys

HIDDEN = {HIDDEN!r}


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{{name}} is hidden by the test's sitecustomize")
        return None


sys.meta_path.insert(0, _Hide())
'''


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_script_runs_to_the_end_without_optional_packages_or_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: the script would measure it for minutes")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(shim), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((out / "env.json").read_text())
    assert not info["gpu"] and not any(info["packages"][p] for p in ("tqdm", "pytest", "scipy"))
    with open(out / "stages.tsv", newline="") as fh:
        stages = {r["stage"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert list(stages) == ["env", "data", "cuda_tests", "kernels", "augment", "decode",
                            "ceiling", "trainer"]
    assert stages["env"]["status"] == "ok"
    for name in list(stages)[1:]:
        assert stages[name]["status"] == "skipped" and "GPU" in stages[name]["note"], name
    assert "pytest" in stages["cuda_tests"]["note"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["value"] for r in summary["report"]] == [gpu_check.NOT_MEASURED] * 7
    assert "| trainer (--loader torch" in done.stdout          # the README table, printed last
    assert (out / "gpu_check.log").read_text().count("skipped") >= 7
    assert sum(int(s["limit"]) for s in stages.values()) < 7 * 60


def test_summary_fills_the_table_from_the_stages_json(tmp_path):
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": [
        {"op": "patch_negatives out=", "input": "bfloat16 NCHW channels_last", "of_copy": 0.85,
         "ms": 0.05, "copy_ms": 0.0425, "host_us": 40.0},
        {"op": "sample_textures out=", "input": "bank", "of_copy": 0.5, "ms": 0.1,
         "copy_ms": 0.05, "host_us": 30.0}]}))
    (tmp_path / "augment.json").write_text(json.dumps({"runs": [
        {"fused_ms_per_batch": 1.5, "torch_ms_per_batch": 9.0, "speedup_fused_vs_torch": 6.0}]}))
    (tmp_path / "ceiling.json").write_text(json.dumps({"img_per_s": 2000.0}))
    (tmp_path / "trainer.json").write_text(json.dumps({"img_per_s": 1900.0,
                                                       "data_wait_pct": 3.25}))
    assert gpu_check.main(["summary", "--out", str(tmp_path)]) == 0
    report = {r["measure"]: r["value"] for r in
              json.loads((tmp_path / "summary.json").read_text())["report"]}
    assert report["patch NS, bf16 NCHW channels_last, out= (vs copy_)"].startswith("85% of copy")
    assert report["patch NS, uint8 NHWC, out= (vs copy_)"] == gpu_check.NOT_MEASURED
    assert report["texture sampling, out= (vs copy_)"].startswith("50% of copy")
    assert report["fused augmentation, 224 px batch of 256"].startswith("fused 1.50 ms")
    trainer = [v for k, v in report.items() if k.startswith("trainer")][0]
    assert trainer == "1900 img/s, data wait 3.2%, 95% of the ceiling"
    assert report["torch loader, GPU decode"] == gpu_check.NOT_MEASURED


def test_data_stage_writes_the_train_split_only_and_once(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "data", "--out", str(out),
           "--images-per-class", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, timeout=120, env=env, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["train", "train.complete"]
    images = sorted((out / "train").rglob("*.jpg"))
    assert len(images) == 10 and len({p.parent for p in images}) == 10
    before = images[0].stat().st_mtime_ns
    done = subprocess.run(cmd, check=True, timeout=120, env=env, capture_output=True, text=True)
    assert "already made" in done.stdout and images[0].stat().st_mtime_ns == before


def test_trainer_stage_reads_the_run_and_drops_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "steps": 30, "img_per_s": 1234.5, "data_wait_pct": 7.5, "final_loss": 9.0,
        "device": "cuda:0", "world_size": 1, "args": {"arch": "resnet50", "size": 224}}))
    (run / "checkpoint.pt").write_bytes(b"x")
    assert gpu_check.main(["trainer", "--run", str(run), "--json", str(tmp_path / "t.json")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["img_per_s"] == 1234.5 and result["data_wait_pct"] == 7.5
    assert result["args"]["arch"] == "resnet50"
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.slow
def test_decode_and_ceiling_stages_run_their_code_on_the_cpu(tmp_path):
    """The GPU stages' code with --device cpu and tiny sizes: everything but the device."""
    from fastneg.data.synthetic import DatasetSpec, make_dataset
    data = make_dataset(tmp_path / "shapes", DatasetSpec(images_per_class=2, size=32),
                        progress=False)
    assert gpu_check.main(["decode", "--device", "cpu", "--data", str(data / "train"),
                           "--size", "32", "--batch-size", "4", "--batches", "2", "--warmup", "1",
                           "--workers", "1", "--json", str(tmp_path / "decode.json")]) == 0
    decode = json.loads((tmp_path / "decode.json").read_text())
    assert decode["images"] == 8 and decode["img_per_s"] > 0
    assert gpu_check.main(["ceiling", "--device", "cpu", "--arch", "resnet10s", "--size", "32",
                           "--batch-size", "4", "--steps", "1", "--warmup", "1", "--queue", "16",
                           "--json", str(tmp_path / "ceiling.json")]) == 0
    ceiling = json.loads((tmp_path / "ceiling.json").read_text())
    assert ceiling["img_per_s"] > 0 and ceiling["arch"] == "resnet10s"
